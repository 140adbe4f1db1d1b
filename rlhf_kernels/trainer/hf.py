"""Real models: a local Hugging Face causal LM as the trainer's policy (``--model PATH``).

``transformers`` is an optional extra (``pip install 'rlhf-kernels[transformers]'``), imported only when
``--model`` is given.  What a ``--model`` run uses instead of the embedded task:

* **Policy** (:class:`HFPolicyValueModel`): the causal LM's base model is the shared backbone (its final,
  normed hidden states), its output embedding the ``lm_head`` (tied or not) and a new ``value_head``
  (``Linear(hidden, 1)``, zero-initialised) reads the same hidden states.  It is a
  :class:`~.model.PolicyValueModel`, so every stage calls it the same way: log-probs from
  ``rlhf_kernels.linear_logprobs(hidden, lm_head.weight, ...)`` (logits never materialised), KV-cache
  generation (the model's own ``DynamicCache``), positions counting real tokens only.  ``--pack``: the
  training forward runs on the real tokens only, concatenated into one row whose position ids restart
  at every sequence (transformers' packed-sequence format: a block-diagonal causal mask, or flash-attn's
  varlen kernel); refused, before any work, for a model whose outputs change when packed.
* **Tokenizer** (``AutoTokenizer`` of the same folder).  Prompts are tokenized as the tokenizer does by
  default (its BOS, if it adds one), left-padded; responses end at the tokenizer's EOS token.  A
  tokenizer without a pad token gets its EOS as the pad token: padded positions are masked everywhere
  (attention, log-probs, losses), so the pad id's value never matters; ``summary.json`` says so.
  A tokenizer without an EOS token is refused.
* **Prompts** (:class:`HFPromptTask`): ``--prompts`` JSONL, one ``{"prompt": "..."}`` object per line;
  each step draws its prompts from them at random (the evaluation too, with its own seed).
* **Reward** (:func:`load_reward`): ``--reward module:function`` imports
  ``function(prompts: list[str], responses: list[str]) -> list[float]`` (one finite score per
  response; the texts are decoded from the tokens without special tokens), or ``--reward PATH``, a local
  Hugging Face sequence-classification model with one label (its ``score`` head read at the response's
  last real token; its tokenizer must be the policy's).  The trainer's own reward models
  (``reward.py``) are trained on the embedded task's preferences and do not apply to real text.

Stages: no SFT and no reward-model training (the model is the starting policy and the reference; the
reward is given); ``sft.pt`` and ``rm.pt`` record the lineage without weights, so ``--resume`` works as
for the built-in model.  Then stage 3 (``--algo``: ppo and the critic-free algorithms; the others need
the embedded task's demonstrations or preference data) and the evaluation of the mean reward and KL to
the starting model on ``eval_prompts`` prompts, before and after.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, TrainConfig
from .model import PolicyValueModel, last_token_values
from .task import Prompts

# The algorithms a --model run can train (the others need the embedded task's demonstrations or
# preference data).
HF_FAMILIES = ("ppo", "critic_free")
HF_EVAL_SEED = 5


def require_transformers():
    """The transformers module, or a :class:`ConfigError` saying how to install it."""
    try:
        import transformers
    except ImportError as exc:
        raise ConfigError(
            [
                f"--model needs the optional dependency transformers ({exc}): "
                "pip install 'rlhf-kernels[transformers]'"
            ]
        ) from None
    return transformers


# ---------------------------------------------------------------------------------------------------
# The policy: a causal LM's backbone and lm_head, plus a value head
# ---------------------------------------------------------------------------------------------------
class HFCache:
    """Generation state for :class:`HFBackbone`: the model's ``DynamicCache``, the attention mask of
    every slot so far and each row's count of real tokens (its next position)."""

    def __init__(self, config, batch: int, device: torch.device):
        from transformers import DynamicCache

        self.kv = DynamicCache(config=config)
        self.mask = torch.zeros(batch, 0, dtype=torch.bool, device=device)
        self.n_real = torch.zeros(batch, dtype=torch.int64, device=device)


class HFBackbone(nn.Module):
    """``backbone(input_ids, attention_mask, cache=None)`` → final hidden states [B, T, D] of a
    transformers base model, positions counting real tokens (``cumsum(mask) − 1``)."""

    def __init__(self, base: nn.Module, pack: bool):
        super().__init__()
        self.base = base
        self.pack = pack

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: HFCache | None = None
    ) -> torch.Tensor:
        mask = attention_mask.bool()
        steps = mask.cumsum(1)
        if cache is None:
            positions = (steps - 1).clamp(min=0)
            if self.pack:
                return self._packed(input_ids, mask, positions)
            out = self.base(
                input_ids=input_ids, attention_mask=mask.long(), position_ids=positions, use_cache=False
            )
            return out.last_hidden_state
        positions = (cache.n_real[:, None] + steps - 1).clamp(min=0)
        cache.mask = torch.cat([cache.mask, mask], 1)
        cache.n_real = cache.n_real + steps[:, -1]
        out = self.base(
            input_ids=input_ids,
            attention_mask=cache.mask.long(),
            position_ids=positions,
            past_key_values=cache.kv,
            use_cache=True,
        )
        return out.last_hidden_state

    def _packed(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The real tokens as one row, position ids restarting per sequence; padded slots get zeros."""
        B, T = input_ids.shape
        index = mask.reshape(-1).nonzero().squeeze(1)  # host sync: nonzero sizes its output on the host
        ids = input_ids.reshape(-1).index_select(0, index)[None]
        pos = positions.reshape(-1).index_select(0, index)[None]
        hidden = self.base(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state[0]
        return hidden.new_zeros(B * T, hidden.shape[-1]).index_copy(0, index, hidden).view(B, T, -1)


class HFPolicyValueModel(PolicyValueModel):
    """A transformers causal LM as a :class:`PolicyValueModel`: its base model is the backbone, its
    output embedding the ``lm_head``, and ``value_head`` is new (zero weight and bias)."""

    def __init__(self, cfg: TrainConfig, causal_lm: nn.Module, eos_id: int, pad_id: int):
        nn.Module.__init__(self)  # not PolicyValueModel.__init__: the layers come from causal_lm
        self.cfg = cfg
        self.hf_config = causal_lm.config
        self.backbone = HFBackbone(causal_lm.base_model, cfg.pack)
        self.lm_head = causal_lm.get_output_embeddings()
        self.value_head = nn.Linear(self.lm_head.weight.shape[1], 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.eos_id, self.pad_id = eos_id, pad_id

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> HFCache:
        return HFCache(self.hf_config, batch, self.lm_head.weight.device)


# Logit transformations some architectures apply after the lm_head; the fused head (and the log-probs of
# the ops) would not see them.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def load_tokenizer(path: str):
    """(tokenizer, eos id, pad id, how the pad token was chosen); :class:`ConfigError` when unusable."""
    transformers = require_transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise ConfigError([f"--model {path}: no tokenizer loads from it ({_first_line(exc)})"]) from None
    if tokenizer.eos_token_id is None:
        raise ConfigError([f"--model {path}: the tokenizer has no EOS token (responses could never end)"])
    if tokenizer.pad_token_id is not None:
        return tokenizer, tokenizer.eos_token_id, tokenizer.pad_token_id, "the tokenizer's pad token"
    return tokenizer, tokenizer.eos_token_id, tokenizer.eos_token_id, "none in the tokenizer: its EOS token"


def load_causal_lm(path: str):
    transformers = require_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise ConfigError([f"--model {path}: not a Hugging Face model folder ({_first_line(exc)})"]) from None
    for name in _LOGIT_TRANSFORMS:
        if getattr(config, name, None) not in (None, 1, 1.0):
            raise ConfigError(
                [
                    f"--model {path}: its config sets {name} = {getattr(config, name)}, a logit "
                    "transform the fused lm_head does not apply"
                ]
            )
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except ValueError as exc:  # transformers: "Unrecognized configuration class ... for AutoModelForCausalLM"
        raise ConfigError(
            [
                f"--model {path}: a {type(config).__name__} ({config.model_type}) is not a causal "
                f"language model ({_first_line(exc)[:120]})"
            ]
        ) from None
    except Exception as exc:
        raise ConfigError([f"--model {path}: the causal LM does not load ({_first_line(exc)})"]) from None


def context_length(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------
def read_prompts(path: str) -> list[str]:
    """The ``"prompt"`` strings of a JSONL file (blank lines skipped); :class:`ConfigError` naming the
    line otherwise."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"--prompts {path}: cannot be read ({_first_line(exc)})"]) from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise ConfigError([f"--prompts {path}:{number}: not JSON ({exc})"]) from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"]:
            raise ConfigError(
                [
                    f"--prompts {path}:{number}: expected an object with a non-empty string "
                    f'"prompt"; got {line.strip()[:60]}'
                ]
            )
        prompts.append(record["prompt"])
    if not prompts:
        raise ConfigError([f"--prompts {path}: no prompt in the file"])
    return prompts


class HFPromptTask:
    """The trainer's task interface over a prompt file: ``sample_prompts`` (random prompts, left-padded
    to the longest of the file; ``topic`` = the prompt's index) and ``gold`` (the reward itself)."""

    def __init__(self, texts: list[str], tokenizer, pad_id: int):
        self.texts = texts
        encoded = [tokenizer(text)["input_ids"] for text in texts]
        self.prompt_len = max(len(ids) for ids in encoded)
        self.ids = torch.full((len(texts), self.prompt_len), pad_id, dtype=torch.int64)
        self.mask = torch.zeros(len(texts), self.prompt_len, dtype=torch.bool)
        for row, ids in enumerate(encoded):
            if ids:
                self.ids[row, -len(ids) :] = torch.tensor(ids)
                self.mask[row, -len(ids) :] = True
        self.empty = [self.texts[row] for row, ids in enumerate(encoded) if not ids]
        self.reward: HFReward | None = None  # set by the pipeline (gold is the reward)

    def sample_prompts(self, n: int, gen: torch.Generator) -> Prompts:
        index = torch.randint(len(self.texts), (n,), generator=gen)
        return Prompts(self.ids[index], self.mask[index], index)

    @torch.no_grad()
    def gold(self, topic: torch.Tensor, responses: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        device = responses.device
        ids = torch.cat([self.ids.to(device)[topic], responses], 1)
        mask = torch.cat([self.mask.to(device)[topic], response_mask], 1)
        return self.reward(ids, mask, None)


# ---------------------------------------------------------------------------------------------------
# Reward: a Python function or a sequence-classification model
# ---------------------------------------------------------------------------------------------------
class HFReward:
    """``reward(ids, mask, rt)`` → scores [B] of [prompt | response] rows (prompts ``prompt_len`` wide),
    the interface of the trainer's reward ensemble."""

    def __init__(self, spec: str, tokenizer, prompt_len: int, fn: Callable | None, model: nn.Module | None):
        self.spec, self.tokenizer, self.prompt_len = spec, tokenizer, prompt_len
        self.fn, self.model = fn, model
        self.models = [] if model is None else [model]

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, rt) -> torch.Tensor:
        if self.model is not None:
            with rt.autocast() if rt is not None else contextlib.nullcontext():
                hidden = self.model.base_model(
                    input_ids=ids,
                    attention_mask=mask.long(),
                    position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                    use_cache=False,
                ).last_hidden_state
                scores = self.model.score(hidden).float()[..., 0]
            return last_token_values(scores, mask)
        P = self.prompt_len
        prompts = self._decode(ids[:, :P], mask[:, :P])
        responses = self._decode(ids[:, P:], mask[:, P:])
        values = self.fn(prompts, responses)
        try:
            scores = torch.as_tensor([float(v) for v in values], dtype=torch.float32)  # host sync: if tensors
        except (TypeError, ValueError) as exc:
            raise TypeError(f"--reward {self.spec}: must return numbers, one per response ({exc})") from None
        if scores.shape != (len(responses),):
            raise ValueError(
                f"--reward {self.spec}: returned {scores.numel()} scores for {len(responses)} responses"
            )
        return scores.to(ids.device)

    def _decode(self, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
        rows = [
            row[keep].tolist() for row, keep in zip(ids.cpu(), mask.cpu())
        ]  # host sync: texts for the function
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)


def load_reward(spec: str, tokenizer, prompt_len: int) -> HFReward:
    """``--reward``: a local sequence-classification model folder, or ``module:function``."""
    if Path(spec).is_dir():
        return HFReward(spec, tokenizer, prompt_len, None, _load_reward_model(spec, tokenizer))
    module_name, colon, name = spec.partition(":")
    if not colon or not module_name or not name:
        raise ConfigError([f"--reward must be module:function or a reward model folder; got {spec!r}"])
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(
            [f"--reward {spec}: module {module_name!r} does not import ({_first_line(exc)})"]
        ) from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError([f"--reward {spec}: {module_name} has no function {name!r}"])
    return HFReward(spec, tokenizer, prompt_len, fn, None)


def _load_reward_model(path: str, tokenizer) -> nn.Module:
    transformers = require_transformers()
    try:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    except Exception as exc:
        raise ConfigError(
            [f"--reward {path}: not a sequence-classification model ({_first_line(exc)})"]
        ) from None
    if model.config.num_labels != 1 or not isinstance(getattr(model, "score", None), nn.Linear):
        raise ConfigError(
            [
                f"--reward {path}: needs one label and a score head (a reward model); got "
                f"{model.config.num_labels} labels, {type(model).__name__}"
            ]
        )
    try:
        theirs = transformers.AutoTokenizer.from_pretrained(path).get_vocab()
    except Exception:  # no tokenizer in the folder: the policy's is assumed
        theirs = None
    if theirs is not None and theirs != tokenizer.get_vocab():
        raise ConfigError([f"--reward {path}: its tokenizer's vocabulary differs from the policy's"])
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------------
# Checks before any work, and the run
# ---------------------------------------------------------------------------------------------------
class HFSetup:
    """Everything a --model run loads, checked: tokenizer, policy, prompts, reward."""

    def __init__(self, cfg: TrainConfig):
        from .algos import ALGORITHMS

        problems = [
            f"--{flag} is required with --model" for flag in ("prompts", "reward") if not getattr(cfg, flag)
        ]
        if ALGORITHMS[cfg.algo].family not in HF_FAMILIES:
            usable = ", ".join(a.name for a in ALGORITHMS.values() if a.family in HF_FAMILIES)
            problems.append(
                f"--algo {cfg.algo} needs the embedded task's demonstrations or preference data; "
                f"with --model use one of {usable}"
            )
        if problems:
            raise ConfigError(problems)
        self.causal_lm = load_causal_lm(cfg.model)
        self.tokenizer, self.eos_id, self.pad_id, self.pad_note = load_tokenizer(cfg.model)
        self.task = HFPromptTask(read_prompts(cfg.prompts), self.tokenizer, self.pad_id)
        if self.task.empty:
            raise ConfigError(
                [f"--prompts {cfg.prompts}: a prompt tokenizes to nothing: {self.task.empty[0]!r}"]
            )
        vocab = self.causal_lm.get_output_embeddings().weight.shape[0]
        if len(self.tokenizer) > vocab:
            raise ConfigError(
                [f"--model {cfg.model}: the tokenizer has {len(self.tokenizer)} tokens, the lm_head {vocab}"]
            )
        if cfg.top_k > vocab:
            raise ConfigError([f"--top_k must be in [0, {vocab}] (the model's vocabulary); got {cfg.top_k}"])
        limit = context_length(self.causal_lm.config)
        need = self.task.prompt_len + cfg.max_new_tokens
        if limit is not None and need > limit:
            raise ConfigError(
                [
                    f"--prompts {cfg.prompts}: the longest prompt has {self.task.prompt_len} tokens; "
                    f"with --max_new_tokens {cfg.max_new_tokens} that is {need} > the model's "
                    f"context of {limit}"
                ]
            )
        self.reward = load_reward(cfg.reward, self.tokenizer, self.task.prompt_len)
        self.task.reward = self.reward
        self.policy = HFPolicyValueModel(cfg, self.causal_lm, self.eos_id, self.pad_id)
        if cfg.pack:
            check_packing(self.policy, cfg.model)


@torch.no_grad()
def check_packing(policy: HFPolicyValueModel, path: str) -> None:
    """--pack only where the model's attention honours packed position ids: two short rows, packed and
    padded, must give the same hidden states."""
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]]) % policy.lm_head.weight.shape[0]
    mask = torch.tensor([[False, False, True, True], [True, True, True, True]])
    backbone = policy.backbone
    backbone.pack = False
    padded = backbone(ids, mask)
    backbone.pack = True
    packed = backbone(ids, mask)
    if not torch.allclose(padded[mask], packed[mask], rtol=1e-4, atol=1e-4):
        raise ConfigError(
            [
                f"--pack: the model in {path} ({policy.hf_config.model_type}, attention "
                f"{getattr(policy.hf_config, '_attn_implementation', '?')}) does not honour "
                "packed position ids; run without --pack"
            ]
        )


@torch.no_grad()
def evaluate(
    rt, cfg: TrainConfig, task: HFPromptTask, policy, ref, reward: HFReward, seed_offset: int
) -> dict:
    """Mean reward, KL per response to the starting model, and length of sampled responses on
    ``eval_prompts`` prompts (all ranks)."""
    from .model import response_labels
    from .ppo import policy_outputs, sample, sequence_kl
    from .task import join

    gen = torch.Generator().manual_seed(cfg.seed * 1009 + HF_EVAL_SEED)
    prompts = task.sample_prompts(cfg.eval_prompts, gen).select(slice(rt.rank, None, rt.world)).to(rt.device)
    sample_gen = torch.Generator(device=rt.device).manual_seed(
        cfg.seed * 1009 + HF_EVAL_SEED + seed_offset + 7919 * rt.rank
    )
    responses, response_mask = sample(rt, cfg, policy, prompts, sample_gen)[:2]
    ids, mask = join(prompts, responses, response_mask)
    labels = response_labels(responses, response_mask)
    logprobs, _ = policy_outputs(rt, cfg, policy, ids, mask, labels, values=False)
    ref_logprobs, _ = policy_outputs(rt, cfg, ref, ids, mask, labels, values=False)
    sums = torch.stack(
        [
            reward(ids, mask, rt).sum(),
            sequence_kl(logprobs, ref_logprobs, response_mask).sum(),
            response_mask.sum().float(),
            torch.full((), float(len(prompts)), device=rt.device),
        ]
    )
    # host sync: the evaluation's one transfer
    score, kl, length, count = rt.all_reduce_sum(sums).tolist()
    return {"reward": score / count, "kl": kl / count, "response_len": length / count}


def run(
    rt, cfg: TrainConfig, setup: HFSetup, plan, save, log, started: float, process_started: float | None
) -> dict:
    """The --model run after the pipeline's checks: lineage checkpoints, the evaluation of the starting
    policy, stage 3 (``--algo``), the final evaluation, ``summary.json``."""
    from . import checkpoint
    from .algos import make_trainer
    from .model import ATTENTION_USED
    from .ppo import frozen_copy
    from .report import op_backends, write_json

    policy = setup.policy.to(rt.device)
    task, reward = setup.task, setup.reward
    if reward.model is not None:
        reward.model.to(rt.device)
    rt.print(
        f"model {cfg.model}: {type(setup.causal_lm).__name__}, "
        f"{sum(p.numel() for p in policy.parameters()):,} parameters (+ value head); "
        f"{len(task.texts)} prompts of at most {task.prompt_len} tokens; pad token: {setup.pad_note}"
    )
    policy.eval()
    ref = frozen_copy(policy)
    states = plan.states
    if "sft" not in states and rt.is_main:
        save(
            "sft", {"model": {}, "results": {"hf_model": cfg.model}}
        )  # lineage only: the weights are --model's
    rt.barrier()
    if "rm" in states:
        results = dict(states["rm"]["results"])
    else:
        rt.at("evaluation of the starting policy")
        with rt.timed("eval_start"):
            results = {"start_eval": evaluate(rt, cfg, task, policy, ref, reward, seed_offset=0)}
        if rt.is_main:
            save("rm", {"ensemble": {"reward": cfg.reward}, "results": results})
        rt.barrier()
    trainer = make_trainer(rt, cfg, policy, ref, reward, task, log, lambda state: save("ppo", state))
    if "ppo" in states:
        trainer.load(states["ppo"], str(checkpoint.checkpoint_paths(plan.out)["ppo"]))
    stage_started = time.perf_counter()
    trainer.run()
    stage_wall = time.perf_counter() - stage_started
    rt.at(f"evaluation of the {cfg.algo} policy")
    with rt.timed("eval_final"):
        final = evaluate(rt, cfg, task, policy, ref, reward, seed_offset=1)
    tokens = trainer.tokens - (states["ppo"]["tokens"] if "ppo" in states else 0)
    summary = {
        "model": cfg.model,
        "model_class": type(setup.causal_lm).__name__,
        "algo": cfg.algo,
        "reward": cfg.reward,
        "pad_token": setup.pad_note,
        "packed": cfg.pack,
        "start_reward": results["start_eval"]["reward"],
        "final_reward": final["reward"],
        "reward_gain": final["reward"] - results["start_eval"]["reward"],
        "final_kl": final["kl"],
        "start_eval": results["start_eval"],
        "final_eval": final,
        "tokens_per_s": tokens / max(stage_wall, 1e-9),
        "wall_s": time.perf_counter() - started,
        "startup_s": None if process_started is None else round(started - process_started, 3),
        "backends": {**op_backends(rt.device), "attention": sorted(ATTENTION_USED) or ["transformers"]},
        "ppo_steps": cfg.ppo_steps,
        "resumed_from": plan.resume_stage,
        "timings_s": {k: round(v, 3) for k, v in sorted(rt.timings.items())},
        "device": str(rt.device),
        "world_size": rt.world,
        "torch": torch.__version__,
        "seed": cfg.seed,
    }
    if rt.is_main:
        write_json(summary, plan.out / "summary.json")
        log.close()
        rt.print(
            f"\n{cfg.algo}: mean reward {summary['start_reward']:.3f} → {summary['final_reward']:.3f} "
            f"(gain {summary['reward_gain']:+.3f}); KL to the starting model {final['kl']:.3f} nats; "
            f"wall {summary['wall_s']:.1f} s\nsummary: {plan.out / 'summary.json'}"
        )
    if not math.isfinite(summary["final_reward"]):
        rt.print("warning: the final mean reward is not finite")
    return summary
