"""Argument checks of fuse_kv on the Python side (fake kernel and reference fallback).

The compiled kernels run the same checks in C++ (csrc/fuse_kv_checks.cpp); both name the
offending argument.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _fail(msg: str):
    raise ValueError(f"fuse_kv: {msg}")


def check_fuse_kv_args(mem_k, mem_v, new_k, new_v, scores, weight, bias, alpha, num_heavy,
                       num_local, valid_len, check_values: bool = True) -> tuple[int, int, int]:
    """Validates the arguments; returns (batch, heads, d). Raises ValueError naming the argument."""
    if mem_k.dtype not in FLOAT_DTYPES:
        _fail(f"mem_k must be float32, float16, bfloat16 or float64, got {mem_k.dtype}")
    for name, t in (("mem_k", mem_k), ("mem_v", mem_v), ("new_k", new_k), ("new_v", new_v)):
        if t.dim() != 4:
            _fail(f"{name} must have rank 4 [batch, heads, seq, d], got rank {t.dim()}")
        if t.device != mem_k.device:
            _fail(f"{name} is on {t.device} but mem_k is on {mem_k.device}; all tensors must be on one device")
        if t.dtype != mem_k.dtype:
            _fail(f"{name} has dtype {t.dtype} but mem_k has dtype {mem_k.dtype}")
    b, h, la, d = mem_k.shape
    lb = new_k.shape[2]
    if mem_v.shape != mem_k.shape:
        _fail(f"mem_v must have the shape of mem_k {tuple(mem_k.shape)}, got {tuple(mem_v.shape)}")
    if (new_k.shape[0], new_k.shape[1], new_k.shape[3]) != (b, h, d):
        _fail(f"new_k must be [{b}, {h}, Lb, {d}] to match mem_k, got {tuple(new_k.shape)}")
    if new_v.shape != new_k.shape:
        _fail(f"new_v must have the shape of new_k {tuple(new_k.shape)}, got {tuple(new_v.shape)}")
    if scores.dim() != 3 or tuple(scores.shape) != (b, h, la + lb):
        _fail(f"scores must be [{b}, {h}, {la + lb}] (batch, heads, La + Lb), got {tuple(scores.shape)}")
    if not scores.dtype.is_floating_point:
        _fail(f"scores must be a float tensor, got {scores.dtype}")
    for name, t in (("scores", scores), ("weight", weight), ("bias", bias), ("alpha", alpha),
                    ("valid_len", valid_len)):
        if t is not None and t.device != mem_k.device:
            _fail(f"{name} is on {t.device} but mem_k is on {mem_k.device}; all tensors must be on one device")
    if weight.dim() != 3:
        _fail(f"weight must have rank 3 [C, 2d, k], got rank {weight.dim()}")
    c, _, k = weight.shape
    if weight.shape[1] != 2 * d:
        _fail(f"weight must have 2d = {2 * d} input channels (keys and values of head dim {d}), got {weight.shape[1]}")
    if k % 2 != 1:
        _fail(f"weight kernel size must be odd, got {k}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != c):
        _fail(f"bias must be [{c}], got {tuple(bias.shape)}")
    if alpha.numel() != 1 or alpha.dim() > 1:
        _fail(f"alpha must be a 0-d or 1-element tensor, got shape {tuple(alpha.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("alpha", alpha)):
        if t is not None and t.dtype != mem_k.dtype:
            _fail(f"{name} has dtype {t.dtype} but mem_k has dtype {mem_k.dtype}")
    if num_heavy < 0:
        _fail(f"num_heavy must be >= 0, got {num_heavy}")
    if not 0 <= num_local <= num_heavy:
        _fail(f"num_local must be in [0, num_heavy = {num_heavy}], got {num_local}")
    if num_heavy + c > la + lb:
        _fail(f"num_heavy + C = {num_heavy + c} slots exceed the La + Lb = {la + lb} cached entries")
    if valid_len is not None:
        if valid_len.dtype != torch.int64:
            _fail(f"valid_len must be int64, got {valid_len.dtype}")
        if valid_len.dim() != 1 or valid_len.shape[0] != b:
            _fail(f"valid_len must be [{b}], got {tuple(valid_len.shape)}")
        if check_values and valid_len.numel() > 0:
            lo, hi = int(valid_len.min()), int(valid_len.max())
            if lo < 0 or hi > la + lb:
                _fail(f"valid_len entries must be in [0, La + Lb = {la + lb}], got values in [{lo}, {hi}]")
    return b, h, d
