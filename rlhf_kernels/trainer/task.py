"""The embedded default task: a synthetic language whose hidden "labeler" rule plays the human annotator.

Vocabulary: ``PAD=0, BOS=1, SEP=2, EOS=3``, then ``n_groups`` topics of ``topic_size`` content tokens
each.  One token of every topic is *banned* (the hidden harmful set).

A prompt is ``BOS q f_1 … f_m SEP``: a query token ``q`` and ``m`` random filler tokens.  A response is
content tokens ending with ``EOS`` (or cut at ``max_new_tokens``).  The labeler's rule, the gold score:

    helpful  = (# response tokens in q's topic) / max(# response tokens, target_len)      ∈ [0, 1]
               (EOS is not a token here; any other, PAD or BOS included, counts in the denominator)
    harmless = 1 if no response token is banned, else 0                                    ∈ {0, 1}
    gold     = (help_weight · helpful + harm_weight · harmless) / (help_weight + harm_weight)

so the best answer stays on the query's topic for at least ``target_len`` tokens while avoiding the
banned token *of that very topic* (helpfulness and harmlessness pull apart).  The demonstrator who writes
the SFT data is imperfect: it stays on topic with probability ``demo_p_relevant`` per token and does not
know the banned set, so the SFT policy inherits a mediocre gold score that PPO can raise.  The simulated
labelers compare responses through a Bradley-Terry / Plackett-Luce model of one aspect's score with
temperature ``label_noise``: noisy pairwise and K-way ranked preferences.

Prompts are left-padded to a common length (their last token is always ``SEP``); responses are
right-padded with ``PAD`` after ``EOS``.  Everything is generated from explicit ``torch.Generator``\\ s,
so a seed reproduces every data set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import TrainConfig

PAD, BOS, SEP, EOS = 0, 1, 2, 3
FIRST_CONTENT = 4


@dataclass
class Prompts:
    ids: torch.Tensor  # [n, P] int64, left-padded with PAD
    mask: torch.Tensor  # [n, P] bool, True on real tokens
    topic: torch.Tensor  # [n] int64, the query token's topic

    def __len__(self) -> int:
        return self.ids.shape[0]

    def select(self, index: torch.Tensor | slice) -> Prompts:
        return Prompts(self.ids[index], self.mask[index], self.topic[index])

    def to(self, device: torch.device | str) -> Prompts:
        # non_blocking: a host → GPU copy of pageable memory need not wait for the GPU.
        return Prompts(*(t.to(device, non_blocking=True) for t in (self.ids, self.mask, self.topic)))

    def repeat_interleave(self, n: int) -> Prompts:
        return Prompts(
            self.ids.repeat_interleave(n, 0),
            self.mask.repeat_interleave(n, 0),
            self.topic.repeat_interleave(n, 0),
        )


@dataclass
class Comparisons:
    """Preference data: per prompt, K candidate responses ordered best → worst by the noisy labeler."""

    prompts: Prompts
    responses: torch.Tensor  # [n, K, R] int64
    response_mask: torch.Tensor  # [n, K, R] bool
    valid: torch.Tensor  # [n, K] bool: K varies by prompt; valid ones come first
    gold: torch.Tensor  # [n, K] float: the labeled aspect's true score (for evaluation only)

    def __len__(self) -> int:
        return self.responses.shape[0]


class LabelerTask:
    """The synthetic task's vocabulary, data generators and hidden rule (see the module docstring)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.n_groups = cfg.n_groups
        self.topic_size = cfg.topic_size
        self.vocab_size = cfg.vocab_size
        self.prompt_len = cfg.prompt_len
        self.response_len = cfg.max_new_tokens
        n_content = cfg.n_groups * cfg.topic_size
        group = torch.full((self.vocab_size,), -1, dtype=torch.int64)
        group[FIRST_CONTENT:] = torch.arange(n_content) // cfg.topic_size
        self.group_of = group
        # The hidden harmful set: one token per topic, at a seed-independent but irregular offset.
        offsets = (torch.arange(cfg.n_groups) * 7 + 3) % cfg.topic_size
        self.banned_tokens = FIRST_CONTENT + torch.arange(cfg.n_groups) * cfg.topic_size + offsets
        banned = torch.zeros(self.vocab_size, dtype=torch.bool)
        banned[self.banned_tokens] = True
        self.is_banned = banned
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(group_of, is_banned) on ``device``, copied there once."""
        if device not in self._tables:
            self._tables[device] = (self.group_of.to(device), self.is_banned.to(device))
        return self._tables[device]

    # --- prompts ------------------------------------------------------------------------------------
    def sample_prompts(self, n: int, gen: torch.Generator) -> Prompts:
        cfg = self.cfg
        P = self.prompt_len
        n_content = self.n_groups * self.topic_size
        query = FIRST_CONTENT + torch.randint(n_content, (n,), generator=gen)
        n_filler = torch.randint(cfg.prompt_min_filler, cfg.prompt_max_filler + 1, (n,), generator=gen)
        filler = FIRST_CONTENT + torch.randint(n_content, (n, P), generator=gen)
        length = n_filler + 3  # BOS q fillers SEP
        col = torch.arange(P)
        start = P - length  # left padding
        rel = col[None, :] - start[:, None]  # position inside the prompt
        ids = torch.where(rel >= 2, filler, torch.full_like(filler, PAD))
        ids = torch.where(rel == 1, query[:, None], ids)
        ids = torch.where(rel == 0, torch.full_like(ids, BOS), ids)
        ids[:, -1] = SEP
        mask = rel >= 0
        ids = torch.where(mask, ids, torch.full_like(ids, PAD))
        return Prompts(ids, mask, self.group_of[query])

    # --- responses ----------------------------------------------------------------------------------
    def sample_responses(
        self,
        topic: torch.Tensor,
        gen: torch.Generator,
        *,
        p_relevant: torch.Tensor,
        p_banned: torch.Tensor,
        n_tokens: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Responses of ``n_tokens`` content tokens (then EOS when it fits), each token on topic with
        probability ``p_relevant`` and replaced by a random banned token with probability ``p_banned``."""
        n = topic.shape[0]
        R = self.response_len
        gs = self.topic_size
        on_topic = FIRST_CONTENT + topic[:, None] * gs + torch.randint(gs, (n, R), generator=gen)
        anywhere = FIRST_CONTENT + torch.randint(self.n_groups * gs, (n, R), generator=gen)
        harmful = self.banned_tokens[torch.randint(self.n_groups, (n, R), generator=gen)]
        u_rel = torch.rand((n, R), generator=gen)
        u_ban = torch.rand((n, R), generator=gen)
        tokens = torch.where(u_rel < p_relevant[:, None], on_topic, anywhere)
        tokens = torch.where(u_ban < p_banned[:, None], harmful, tokens)
        col = torch.arange(R)
        tokens = torch.where(col[None, :] < n_tokens[:, None], tokens, torch.full_like(tokens, PAD))
        tokens = torch.where(col[None, :] == n_tokens[:, None], torch.full_like(tokens, EOS), tokens)
        mask = col[None, :] <= n_tokens[:, None]
        return tokens, mask

    def demonstrations(self, prompts: Prompts, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """What the imperfect demonstrator writes (the SFT data)."""
        n = len(prompts)
        cfg = self.cfg
        n_tokens = torch.randint(cfg.demo_min_len, cfg.demo_max_len + 1, (n,), generator=gen)
        p_rel = torch.full((n,), cfg.demo_p_relevant)
        return self.sample_responses(
            prompts.topic, gen, p_relevant=p_rel, p_banned=torch.zeros(n), n_tokens=n_tokens
        )

    def diverse_responses(
        self, topic: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Responses of every quality, for the preference data: per response, a random on-topic rate,
        harmful rate (zero a third of the time) and length (cut without EOS now and then)."""
        n = topic.shape[0]
        p_rel = torch.rand(n, generator=gen)
        p_ban = torch.rand(n, generator=gen) * 0.4 * (torch.rand(n, generator=gen) > 0.33)
        n_tokens = torch.randint(0, self.response_len + 1, (n,), generator=gen)
        return self.sample_responses(topic, gen, p_relevant=p_rel, p_banned=p_ban, n_tokens=n_tokens)

    # --- the hidden rule ----------------------------------------------------------------------------
    def scores(self, topic: torch.Tensor, responses: torch.Tensor, response_mask: torch.Tensor) -> dict:
        """{"helpful", "harmless", "overall"} per response, each float32 [...] in [0, 1]."""
        group_of, is_banned = self.tables(responses.device)
        content = response_mask & (responses >= FIRST_CONTENT)
        n_tokens = (response_mask & (responses != EOS)).sum(-1)  # stray special tokens count against it
        group = group_of[responses]
        relevant = content & (group == topic[..., None])
        banned = content & is_banned[responses]
        helpful = relevant.sum(-1).float() / n_tokens.clamp(min=self.cfg.target_len).float()
        harmless = (banned.sum(-1) == 0).float()
        hw, ww = self.cfg.help_weight, self.cfg.harm_weight
        overall = (hw * helpful + ww * harmless) / (hw + ww)
        return {"helpful": helpful, "harmless": harmless, "overall": overall}

    def gold(self, topic: torch.Tensor, responses: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        return self.scores(topic, responses, response_mask)["overall"]

    # --- preferences --------------------------------------------------------------------------------
    def comparisons(
        self, n: int, aspect: str, gen: torch.Generator, *, k_min: int = 2, k_max: int = 2
    ) -> Comparisons:
        """``n`` prompts, each with K ∈ [k_min, k_max] responses (padded to k_max; ``valid`` marks them),
        ranked best → worst by a labeler who judges ``aspect`` with Plackett-Luce noise."""
        cfg = self.cfg
        K = k_max
        R = self.response_len
        prompts = self.sample_prompts(n, gen)
        topic = prompts.topic.repeat_interleave(K)
        responses, mask = self.diverse_responses(topic, gen)
        responses, mask = responses.view(n, K, R), mask.view(n, K, R)
        gold = self.scores(prompts.topic[:, None], responses, mask)[aspect]
        k = torch.randint(k_min, k_max + 1, (n,), generator=gen)
        valid = torch.arange(K)[None, :] < k[:, None]
        # Plackett-Luce through the Gumbel trick: sorting score/noise + Gumbel noise draws a ranking
        # (for K = 2 this is Bradley-Terry: P(a ≻ b) = σ((g_a − g_b) / noise)).
        u = torch.rand((n, K), generator=gen).clamp(1e-9, 1 - 1e-9)
        key = gold / max(cfg.label_noise, 1e-6) - torch.log(-torch.log(u))
        key = torch.where(valid, key, torch.full_like(key, float("-inf")))
        order = key.argsort(dim=1, descending=True, stable=True)
        take = order[:, :, None].expand(n, K, R)
        return Comparisons(
            prompts=prompts,
            responses=responses.gather(1, take),
            response_mask=mask.gather(1, take),
            valid=valid,  # the invalid (-inf) ones sort last, so the valid ones stay a prefix
            gold=gold.gather(1, order),
        )


def join(
    prompts: Prompts, responses: torch.Tensor, response_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """[prompt | response] ids and attention mask, [n, P + R]."""
    return torch.cat([prompts.ids, responses], 1), torch.cat([prompts.mask, response_mask], 1)
