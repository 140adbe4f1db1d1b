"""Float64 oracle of masked whitening: the direct formula, selection by selection."""

from __future__ import annotations

import torch


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    shift_mean: bool = True,
    unbiased: bool = True,
    eps: float = 1e-8,
    dim: int | None = None,
    process_group=None,
) -> torch.Tensor:
    """out = (x − μ)·rsqrt(var + eps) where m ≠ 0, else 0; plus μ when not shift_mean.  μ = Σxm/Σm,
    var = Σ(x − μ)²m/Σm·n/(n−1) (unbiased).  Empty selection: μ = var = 0; unbiased with n = 1: var = 0.
    ``process_group``: every rank's x and mask are gathered (whole, as objects), concatenated in rank
    order and whitened together; this rank's part is returned."""
    if process_group is not None:
        import torch.distributed as dist

        parts = [None] * dist.get_world_size(process_group)
        dist.all_gather_object(parts, (x.detach().cpu().reshape(-1), mask.detach().cpu().reshape(-1)),
                               group=process_group)
        whole = masked_whiten(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                              shift_mean=shift_mean, unbiased=unbiased, eps=eps)
        start = sum(p[0].numel() for p in parts[: dist.get_rank(process_group)])
        return whole[start : start + x.numel()].reshape(x.shape)
    xd = x.double()
    md = mask.double()
    if x.numel() == 0:
        return torch.zeros_like(xd)
    if dim is None:
        rows_x, rows_m = xd.reshape(1, -1), md.reshape(1, -1)
    else:
        rows_x, rows_m = xd.reshape(-1, x.shape[-1]), md.reshape(-1, x.shape[-1])
    out = torch.zeros_like(rows_x)
    for i in range(rows_x.shape[0]):
        xs, ms = rows_x[i], rows_m[i]
        valid = ms != 0
        n = ms[valid].sum()
        if n > 0:
            mean = (xs[valid] * ms[valid]).sum() / n
            var = ((xs[valid] - mean) ** 2 * ms[valid]).sum() / n
            if unbiased:
                var = var * n / (n - 1) if n > 1 else torch.zeros((), dtype=torch.float64)
        else:
            mean = torch.zeros((), dtype=torch.float64)
            var = torch.zeros((), dtype=torch.float64)
        row = torch.where(valid, (xs - mean) / torch.sqrt(var + eps), torch.zeros_like(xs))
        out[i] = row if shift_mean else row + mean
    return out.reshape(x.shape)
