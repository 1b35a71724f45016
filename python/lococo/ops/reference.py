"""The LoCoCo compressor in plain PyTorch: the ground truth for every kernel.

This is docs/design.md#the-compressor, vectorised over batch rows and KV heads. It favours
clarity over speed (it builds the concatenated cache and the dense one-hot matrix), is differentiable
through autograd in every float input but ``scores``, and is the fallback where no compiled
kernel exists for a device.

Shapes: ``mem_k``/``mem_v`` [b, h, La, d], ``new_k``/``new_v`` [b, h, Lb, d], ``scores``
[b, h, La + Lb], ``weight`` [C, 2d, k], ``bias`` [C] or None, ``alpha`` 0-d or 1 element.
Result: keys and values [b, h, H + C, d] in the dtype of ``mem_k``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_fuse_kv_args

__all__ = ["fuse_kv", "rank_order", "compute_dtype"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: float64 stays float64, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rank_order(scores: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """Indices along the last axis, best first.

    Order: eligible before ineligible, then non-NaN before NaN, then larger score first,
    then lower index first (ties go to the lower index). Every ``topk`` in LoCoCo is a
    prefix of this order.
    """
    s = scores.to(torch.float64)
    nan = torch.isnan(s)
    order = torch.sort(s.masked_fill(nan, float("-inf")), dim=-1, descending=True, stable=True).indices
    for worse in (nan, ~eligible):  # applied in reverse priority: the last sort dominates
        key = worse.gather(-1, order).to(torch.int8)
        order = order.gather(-1, torch.sort(key, dim=-1, stable=True).indices)
    return order


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [r, L, d] gathered at index [r, n] along the sequence axis."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _compress_rows(keys, values, scores, valid, weight, bias, alpha, num_heavy, num_local):
    """Compress rows that all have at least H + C valid entries.

    keys/values [r, L, d] (compute dtype), scores [r, L], valid [r, L] bool (a suffix).
    """
    r, L, d = keys.shape
    C, k = weight.shape[0], weight.shape[-1]
    H, l = num_heavy, num_local
    n_valid = valid.sum(-1)                                  # [r]
    pos = torch.arange(L, device=keys.device).expand(r, L)

    # 1. Heavy hitters: the l last valid entries plus the best H - l of the other valid ones.
    local = pos >= L - l
    heavy = local.clone()
    if H > l:
        best = rank_order(scores, valid & ~local)[:, : H - l]
        heavy.scatter_(1, best, True)
    heavy_idx = torch.sort(torch.where(heavy, pos, L), dim=-1).values[:, :H]   # cache order
    if C == 0:  # nothing to fuse: pure top-H selection
        return _take(keys, heavy_idx), _take(values, heavy_idx)

    # 2. The rest, left-aligned in cache order; slots past each row's count are padding.
    rest = valid & ~heavy
    n_rest = n_valid - H                                     # [r], >= C
    rest_idx = torch.sort(torch.where(rest, pos, L), dim=-1).values[:, : L - H]
    in_rest = torch.arange(L - H, device=keys.device) < n_rest.unsqueeze(-1)
    rest_idx = torch.where(in_rest, rest_idx, 0)
    k_rest = _take(keys, rest_idx).masked_fill(~in_rest.unsqueeze(-1), 0)
    v_rest = _take(values, rest_idx).masked_fill(~in_rest.unsqueeze(-1), 0)
    s_rest = scores.gather(1, rest_idx)

    # 3. Residual picks: the best C of the rest, by position, as a one-hot matrix.
    picks = torch.sort(rank_order(s_rest, in_rest)[:, :C], dim=-1).values
    one_hot = F.one_hot(picks, L - H).to(keys.dtype)         # [r, C, L - H]

    # 4-5. Convolution scores over [K_R; V_R], ReLU, softmax over the rest's positions.
    x = torch.cat([k_rest, v_rest], dim=-1).transpose(1, 2)  # [r, 2d, L - H]
    z = F.relu(F.conv1d(x, weight, bias, padding=(k - 1) // 2))
    z = z.masked_fill(~in_rest.unsqueeze(1), float("-inf"))
    p = torch.softmax(z, dim=-1)

    # 6-8. Mix, fuse keys and values with the same weights, append after the heavy hitters.
    mix = (1 - alpha) * one_hot + alpha * p
    keys_out = torch.cat([_take(keys, heavy_idx), mix @ k_rest], dim=1)
    values_out = torch.cat([_take(values, heavy_idx), mix @ v_rest], dim=1)
    return keys_out, values_out


def fuse_kv(
    mem_k: torch.Tensor,
    mem_v: torch.Tensor,
    new_k: torch.Tensor,
    new_v: torch.Tensor,
    scores: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    alpha: torch.Tensor,
    num_heavy: int,
    num_local: int = 0,
    valid_len: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress the logical cache [mem ; new] of every (row, KV head) into H + C slots.

    A row with fewer than H + C valid entries keeps them all, right-aligned, with zeros in
    front. Bad arguments raise the ValueError of the op, naming the argument.
    """
    check_fuse_kv_args(mem_k, mem_v, new_k, new_v, scores, weight, bias, alpha, num_heavy, num_local, valid_len)
    b, h, _, d = mem_k.shape
    L = mem_k.shape[2] + new_k.shape[2]
    out_dtype = mem_k.dtype
    cdt = compute_dtype(out_dtype)
    # every size explicit: a -1 cannot be inferred when a batch, head or feature dimension is 0
    keys = torch.cat([mem_k, new_k], dim=2).to(cdt).reshape(b * h, L, d)
    values = torch.cat([mem_v, new_v], dim=2).to(cdt).reshape(b * h, L, d)
    C = weight.shape[0]
    M = num_heavy + C

    n_valid = torch.full((b,), L, dtype=torch.long, device=keys.device)
    if valid_len is not None:
        n_valid = valid_len.to(device=keys.device, dtype=torch.long).clamp(0, L)
    n_valid = n_valid.repeat_interleave(h)                   # [b * h]
    valid = torch.arange(L, device=keys.device) >= (L - n_valid).unsqueeze(-1)

    # Rows too short to compress keep their valid entries, right-aligned in M slots.
    keep = n_valid < M
    src = torch.arange(M, device=keys.device) + (L - M)      # slot j holds entry L - M + j
    src_ok = (src >= L - n_valid.unsqueeze(-1)) & (src >= 0)
    src = src.clamp(min=0).expand(b * h, M)
    keys_out = _take(keys, src).masked_fill(~src_ok.unsqueeze(-1), 0)
    values_out = _take(values, src).masked_fill(~src_ok.unsqueeze(-1), 0)

    rows = torch.nonzero(~keep).flatten()
    if rows.numel() > 0 and d > 0:  # with d = 0 every slot is empty: nothing to compute
        w = weight.to(cdt)
        bias_c = None if bias is None else bias.to(cdt)
        a = alpha.to(cdt).reshape(())
        ck, cv = _compress_rows(
            keys[rows], values[rows], scores.reshape(b * h, L)[rows], valid[rows],
            w, bias_c, a, num_heavy, num_local,
        )
        keys_out = keys_out.index_put((rows,), ck)
        values_out = values_out.index_put((rows,), cv)

    shape = (b, h, M, d)
    return keys_out.reshape(shape).to(out_dtype), values_out.reshape(shape).to(out_dtype)
