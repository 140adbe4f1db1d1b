"""``nn.Module`` wrappers around the library's ops, for patching a model's forward."""

from __future__ import annotations

import torch
from torch import nn

from ._validation import check_int, check_positive
from .ops.linear_logprobs import linear_logprobs


class LinearLogprobs(nn.Module):
    """Wraps a model's lm_head (``nn.Linear(H, V)``, or any module with a [V, H] ``weight`` and optional
    ``bias``) so that a patched forward gets log-probs (and entropy) from hidden states directly, through
    :func:`rlhf_kernels.linear_logprobs`:

        head = LinearLogprobs(model.lm_head, temperature=0.7)
        logprobs, entropy = head(hidden_states[:, :-1], input_ids[:, 1:], return_entropy=True)

    The lm_head stays a submodule: its parameters are shared, not copied, and receive the gradients.
    """

    def __init__(self, lm_head: nn.Module, *, temperature: float = 1.0, ignore_index: int = -100,
                 batch_invariant: bool = False, process_group=None) -> None:
        super().__init__()
        weight = getattr(lm_head, "weight", None)
        if not isinstance(lm_head, nn.Module) or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise TypeError(
                "lm_head must be an nn.Module with a 2-D [V, H] weight (e.g. nn.Linear); "
                f"got {type(lm_head).__name__}"
            )
        self.lm_head = lm_head
        self.temperature = check_positive("temperature", temperature)
        self.ignore_index = check_int("ignore_index", ignore_index)
        self.batch_invariant = batch_invariant  # checked by linear_logprobs on every call
        self.process_group = process_group

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor, *, temperature: float | None = None,
                return_entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return linear_logprobs(
            hidden, self.lm_head.weight, labels, bias=getattr(self.lm_head, "bias", None),
            temperature=self.temperature if temperature is None else temperature,
            ignore_index=self.ignore_index, return_entropy=return_entropy,
            batch_invariant=self.batch_invariant, process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        extra = ", batch_invariant=True" if self.batch_invariant else ""
        return f"temperature={self.temperature}, ignore_index={self.ignore_index}{extra}"
