"""A small decoder-only transformer with one shared backbone and two heads.

``PolicyValueModel`` = backbone (token + learned position embeddings, pre-LN blocks, final LN) with
``lm_head`` (the policy: next-token logits) and ``value_head`` (a scalar per position).  In PPO the two
heads share the backbone, so one forward gives the log-probs and the values; the reward model is the same
class, initialised from the SFT weights, whose scalar head reads the score at the response's last token.

Padding: prompts are left-padded and responses right-padded; ``attention_mask`` marks real tokens.
Positions count real tokens only (``cumsum(mask) − 1``), so a sequence gives the same outputs whatever
its padding.  Padded query rows attend to themselves only (no all-masked softmax row, so no NaN); their
outputs are never read.

Attention is ``torch.nn.functional.scaled_dot_product_attention`` with a boolean mask, or, on CUDA with
fp16/bf16 activations and flash-attn installed, ``flash_attn_varlen_func`` on the unpadded tokens
(imported lazily; the KV-cache decode step always uses SDPA).

Log-probs go through the library: ``rlhf_kernels.linear_logprobs`` (lm_head fused, logits never
materialised) when ``fused_lm_head`` is set, else the lm_head followed by
``rlhf_kernels.logprobs_from_logits``.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import rlhf_kernels

from .config import TrainConfig
from .task import EOS, PAD

IGNORE_INDEX = -100

# Which attention implementation ran (reported in summary.json).
ATTENTION_USED: set[str] = set()

_FLASH = None


def _flash_varlen():
    """flash_attn_varlen_func, or None when flash-attn is not installed (imported once, lazily)."""
    global _FLASH
    if _FLASH is None:
        try:
            from flash_attn import flash_attn_varlen_func
        except Exception:  # not installed, or built for another torch/CUDA
            flash_attn_varlen_func = False
        _FLASH = flash_attn_varlen_func
    return _FLASH or None


class KVCache:
    """Preallocated keys/values of every layer for batched decoding."""

    def __init__(
        self,
        n_layer: int,
        batch: int,
        n_head: int,
        max_len: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.k = torch.zeros(n_layer, batch, n_head, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.n_real = torch.zeros(batch, dtype=torch.int64, device=device)  # position of the next real token
        self.length = 0  # slots filled (Python int: shapes depend on it, the data does not)
        self.max_len = max_len


class Attention(nn.Module):
    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.d_model // cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.allow_flash = cfg.attention == "auto"

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor,
        key_mask: torch.Tensor | None,
        cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).unbind(2)
        if cache is None and key_mask is not None and self._use_flash(q):
            y = _flash_attention(q, k, v, key_mask)
        else:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, hd]
            if cache is not None:
                start = cache.length
                cache.k[layer, :, :, start : start + T] = k
                cache.v[layer, :, :, start : start + T] = v
                k = cache.k[layer, :, :, : start + T]
                v = cache.v[layer, :, :, : start + T]
            ATTENTION_USED.add("sdpa")
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2)
        return self.proj(y.reshape(B, T, D))

    def _use_flash(self, q: torch.Tensor) -> bool:
        return (
            self.allow_flash
            and q.is_cuda
            and q.dtype in (torch.float16, torch.bfloat16)
            and _flash_varlen() is not None
        )


def _flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor
) -> torch.Tensor:
    """Causal attention among each row's real tokens via flash-attn's varlen kernel ([B, T, H, hd]).

    Real tokens keep their order when the padding is removed, so "causal among the unpadded tokens" is
    exactly the masked attention SDPA computes; padded rows come back as zeros.  Syncs twice (the real
    tokens' positions and the maximum length)."""
    B, T, H, hd = q.shape
    flat = key_mask.reshape(-1)
    index = flat.nonzero().squeeze(1)  # host sync: nonzero sizes its output on the host
    lengths = key_mask.sum(1, dtype=torch.int32)
    cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    max_len = int(lengths.max())  # host sync: flash-attn needs it as a Python int
    qu, ku, vu = (t.reshape(B * T, H, hd).index_select(0, index) for t in (q, k, v))
    out = _flash_varlen()(qu, ku, vu, cu, cu, max_len, max_len, causal=True)
    ATTENTION_USED.add("flash_attn")
    return q.new_zeros(B * T, H, hd).index_copy(0, index, out).view(B, T, H, hd)


class Block(nn.Module):
    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.out = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x, attn_mask, key_mask, cache, layer):
        x = x + self.attn(self.ln1(x), attn_mask, key_mask, cache, layer)
        return x + self.out(
            F.relu(self.fc(self.ln2(x)))
        )  # ReLU: its backward is 5x cheaper than GELU's on CPU


class Backbone(nn.Module):
    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: KVCache | None = None
    ) -> torch.Tensor:
        """Hidden states [B, T, D] of ``input_ids`` [B, T]; with ``cache``, the T new tokens follow the
        cached ones (their keys/values are appended)."""
        B, T = input_ids.shape
        mask = attention_mask.bool()
        device = input_ids.device
        steps = torch.cumsum(mask, 1)
        if cache is None:
            positions = (steps - 1).clamp(min=0)
            key_valid, start = mask, 0
        else:
            positions = (cache.n_real[:, None] + steps - 1).clamp(min=0)
            start = cache.length
            if start + T > cache.max_len:
                raise ValueError(f"KV cache holds {cache.max_len} tokens; {start} + {T} requested")
            cache.key_valid[:, start : start + T] = mask
            cache.n_real += steps[:, -1]
            key_valid = cache.key_valid[:, : start + T]
        # attend[b, i, j]: key j is real and not after query i; every query sees at least itself.
        query_slot = torch.arange(start, start + T, device=device)[:, None]
        key_slot = torch.arange(start + T, device=device)[None, :]
        attend = (key_slot <= query_slot)[None] & key_valid[:, None, :]
        attend = attend | (key_slot == query_slot)[None]
        attn_mask = attend[:, None]  # [B, 1, T, start + T]

        x = self.tok_emb(input_ids) + self.pos_emb(positions.clamp(max=self.cfg.seq_len - 1))
        for layer, block in enumerate(self.blocks):
            x = block(x, attn_mask, mask if cache is None else None, cache, layer)
        if cache is not None:
            cache.length += T
        return self.ln_f(x)


class ModelOutput(NamedTuple):
    logprobs: torch.Tensor | None  # [B, R] fp32: log π(labels) for the last R positions
    entropy: torch.Tensor | None  # [B, R] fp32
    values: torch.Tensor | None  # [B, T] fp32: value-head output at every position
    sum_sq_probs: torch.Tensor | None = None  # [B, R] fp32: Σ_v π(v)² at the label positions (0: padded)
    policy_loss: tuple | None = None  # (loss, metrics) of rlhf_kernels.linear_policy_loss (--fused_loss)


class PolicyValueModel(nn.Module):
    """One backbone, two heads: ``lm_head`` (policy) and ``value_head`` (values / reward score)."""

    eos_id, pad_id = EOS, PAD  # what generate() ends and pads responses with (hf.py: the tokenizer's)

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.value_head = nn.Linear(cfg.d_model, 1)
        self.apply(self._init)
        for block in self.backbone.blocks:  # GPT-2's scaled init of the residual projections
            nn.init.normal_(block.out.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))
            nn.init.normal_(block.attn.proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))
        nn.init.zeros_(self.value_head.weight)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        temperature: float = 1.0,
        return_entropy: bool = False,
        return_values: bool = False,
        return_sum_sq_probs: bool = False,
        policy_loss: dict | None = None,
    ) -> ModelOutput:
        """Log-probs of ``labels`` [B, R] (the last R tokens of ``input_ids``, IGNORE_INDEX where padded),
        read from the hidden states one position earlier, and/or the value head at every position.

        ``return_sum_sq_probs``: also Σ_v π(v)² per label position (the optimal-token-baseline estimators'
        input), from the same pass over the lm_head.  ``policy_loss``: the keywords of
        ``rlhf_kernels.linear_policy_loss`` after ``mask`` (old_logprobs, advantages, mask, loss, ...):
        the policy loss straight from the hidden states and the lm_head weight (``--fused_loss``), inside
        this forward (so DDP sees the lm_head used); ``logprobs`` are then its detached log-probs,
        ``entropy`` None and ``policy_loss`` its (loss, metrics)."""
        hidden = self.backbone(input_ids, attention_mask)
        logprobs = entropy = values = sum_sq = fused = None
        if labels is not None:
            R = labels.shape[1]
            head = hidden[:, -R - 1 : -1]
            if policy_loss is not None:
                loss, metrics, logprobs = self.fused_policy_loss(head, labels, temperature, policy_loss)
                fused = (loss, metrics)
            elif return_sum_sq_probs:
                logprobs, entropy, sum_sq = self.token_stats(head, labels, temperature, return_entropy)
            else:
                result = self.token_logprobs(
                    head, labels, temperature=temperature, return_entropy=return_entropy
                )
                logprobs, entropy = result if return_entropy else (result, None)
        if return_values:
            values = self.value_head(hidden).squeeze(-1).float()
        return ModelOutput(logprobs, entropy, values, sum_sq, fused)

    def fused_policy_loss(self, hidden, labels, temperature: float, kwargs: dict):
        """``rlhf_kernels.linear_policy_loss`` of the lm_head over ``hidden``: (loss, metrics, logprobs)."""
        bias = self.lm_head.bias
        return rlhf_kernels.linear_policy_loss(
            hidden,
            self.lm_head.weight.to(hidden.dtype),
            labels,
            bias=None if bias is None else bias.to(hidden.dtype),
            temperature=temperature,
            ignore_index=IGNORE_INDEX,
            return_logprobs=True,
            **kwargs,
        )

    def token_stats(self, hidden, labels, temperature: float, return_entropy: bool):
        """(logprobs, entropy or None, Σπ²) of ``labels``: ``linear_token_stats`` (fused head) or
        ``token_stats_from_logits``, one pass either way."""
        kwargs = dict(
            temperature=temperature, ignore_index=IGNORE_INDEX, entropy=return_entropy, sum_sq_probs=True
        )
        if self.cfg.fused_lm_head:
            weight, bias = self.lm_head.weight.to(hidden.dtype), self.lm_head.bias
            bias = None if bias is None else bias.to(hidden.dtype)
            stats = rlhf_kernels.linear_token_stats(hidden, weight, labels, bias=bias, **kwargs)
        else:
            stats = rlhf_kernels.token_stats_from_logits(self.lm_head(hidden), labels, **kwargs)
        return stats.logprobs, stats.entropy, stats.sum_sq_probs

    def token_logprobs(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        *,
        temperature: float = 1.0,
        return_entropy: bool = False,
    ):
        weight = self.lm_head.weight
        if self.cfg.fused_lm_head:
            return rlhf_kernels.linear_logprobs(
                hidden,
                weight.to(hidden.dtype),
                labels,
                temperature=temperature,
                ignore_index=IGNORE_INDEX,
                return_entropy=return_entropy,
            )
        return rlhf_kernels.logprobs_from_logits(
            self.lm_head(hidden),
            labels,
            temperature=temperature,
            ignore_index=IGNORE_INDEX,
            return_entropy=return_entropy,
        )

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        cfg = self.cfg
        weight = self.lm_head.weight
        return KVCache(
            cfg.n_layer,
            batch,
            cfg.n_head,
            max_len,
            cfg.d_model // cfg.n_head,
            weight.device,
            dtype or weight.dtype,
        )


def sample_token(
    logits: torch.Tensor, *, temperature: float, top_k: int, generator: torch.Generator | None
) -> torch.Tensor:
    """One token per row from ``softmax(logits / temperature)`` restricted to the top-k (0: all);
    ``temperature == 0`` is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _gathered(fn):
    """FSDP2 (``--fsdp``): the root's parameters (embeddings, lm_head) gathered for generation's direct
    calls of the backbone and the lm_head, and sharded again after (the blocks gather their own)."""

    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        inner = getattr(model, "module", model)
        if not callable(getattr(inner, "unshard", None)):
            return fn(model, *args, **kwargs)
        inner.unshard()
        try:
            return fn(model, *args, **kwargs)
        finally:
            inner.reshard()

    return wrapper


@_gathered
@torch.no_grad()
def generate(
    model: PolicyValueModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    eos_id: int | None = None,
    pad_id: int | None = None,
    return_logprobs: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Batched sampling after left-padded prompts.

    Returns ``responses`` [B, R] and ``response_mask`` [B, R] (R = max_new_tokens): each row's tokens up
    to and including its first EOS, then ``pad_id`` with mask False.  A row that never samples EOS is
    cut at R tokens.  ``use_cache=False`` recomputes the whole prefix every step (the reference the
    KV-cache path is tested against).  ``return_logprobs``: also the rollout engine's log-probs [B, R] of
    the sampled tokens under the distribution sampled from (temperature and top-k applied; temperature 0:
    the untempered softmax), 0 where masked: what the trainer's rollout correction compares with the
    training forward's.
    """
    model = getattr(model, "module", model)  # unwrap DDP: generation needs no gradient sync
    eos_id = model.eos_id if eos_id is None else eos_id  # None: the model's (the embedded task's EOS/PAD,
    pad_id = model.pad_id if pad_id is None else pad_id  # or a Hugging Face tokenizer's)
    B, P = prompt_ids.shape
    device = prompt_ids.device
    responses = torch.full((B, max_new_tokens), pad_id, dtype=torch.int64, device=device)
    response_mask = torch.zeros((B, max_new_tokens), dtype=torch.bool, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    sampled_logprobs = torch.zeros((B, max_new_tokens), device=device) if return_logprobs else None
    cache = model.new_cache(B, P + max_new_tokens, dtype=_activation_dtype(model)) if use_cache else None
    hidden = model.backbone(prompt_ids, prompt_mask, cache)
    for t in range(max_new_tokens):
        logits = model.lm_head(hidden[:, -1])
        token = sample_token(logits, temperature=temperature, top_k=top_k, generator=generator)
        alive = ~finished
        token = torch.where(alive, token, torch.full_like(token, pad_id))
        responses[:, t] = token
        response_mask[:, t] = alive
        if sampled_logprobs is not None:
            logprob = _sampled_logprob(logits, token, temperature, top_k)
            sampled_logprobs[:, t] = torch.where(alive, logprob, 0.0)
        finished = finished | (token == eos_id)
        # host sync: once per token, to stop when every row has ended (saves the remaining steps)
        if t == max_new_tokens - 1 or bool(finished.all()):
            break
        if cache is not None:
            hidden = model.backbone(token[:, None], alive[:, None], cache)
        else:
            ids = torch.cat([prompt_ids, responses[:, : t + 1]], 1)
            mask = torch.cat([prompt_mask, response_mask[:, : t + 1]], 1)
            hidden = model.backbone(ids, mask)
    if sampled_logprobs is not None:
        return responses, response_mask, sampled_logprobs
    return responses, response_mask


def _sampled_logprob(
    logits: torch.Tensor, token: torch.Tensor, temperature: float, top_k: int
) -> torch.Tensor:
    """log p(token) under the distribution :func:`sample_token` draws from (temperature 0: temperature 1)."""
    logits = logits.float() / (temperature if temperature > 0 else 1.0)
    if temperature > 0 and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.log_softmax(logits, dim=-1).gather(-1, token.clamp(min=0)[:, None]).squeeze(-1)


def _activation_dtype(model: nn.Module) -> torch.dtype:
    if torch.is_autocast_enabled("cuda") and model.lm_head.weight.is_cuda:
        return torch.get_autocast_dtype("cuda")
    return model.lm_head.weight.dtype


def response_labels(responses: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Labels for the log-prob ops: the response tokens, IGNORE_INDEX where padded."""
    return torch.where(response_mask, responses, torch.full_like(responses, IGNORE_INDEX))


def last_token_values(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """values[b, last real position of row b] for right-padded rows ([B, T] → [B])."""
    T = attention_mask.shape[1]
    slots = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    last = torch.where(attention_mask.bool(), slots, torch.zeros_like(slots)).amax(1)
    return values.gather(1, last[:, None]).squeeze(1)
