"""torch.ops.lococo.fuse_kv: fake kernels, autograd, and the typed entry point ``fuse_kv``.

The schemas live in csrc/ops.cpp and each backend registers its kernels in C++; this file adds
what torch.compile and autograd need. The backward is the op ``fuse_kv_backward``, so a
compiled graph keeps it as one node.
"""

from __future__ import annotations

import torch

from . import library as _library, reference
from .checks import check_fuse_kv_args

__all__ = ["fuse_kv"]


def _out_shape(mem_k, weight, num_heavy):
    b, h, _, d = mem_k.shape
    return (b, h, num_heavy + weight.shape[0], d)


if _library.compiled():

    @torch.library.register_fake("lococo::fuse_kv")
    def _fuse_kv_fake(mem_k, mem_v, new_k, new_v, scores, weight, bias, alpha, num_heavy,
                      num_local=0, valid_len=None):
        check_fuse_kv_args(mem_k, mem_v, new_k, new_v, scores, weight, bias, alpha, num_heavy,
                           num_local, valid_len, check_values=False)
        shape = _out_shape(mem_k, weight, num_heavy)
        return mem_k.new_empty(shape), mem_k.new_empty(shape)

    @torch.library.register_fake("lococo::fuse_kv_backward")
    def _fuse_kv_backward_fake(grad_k, grad_v, mem_k, mem_v, new_k, new_v, scores, weight, bias,
                               alpha, num_heavy, num_local, valid_len):
        return (torch.empty_like(mem_k, memory_format=torch.contiguous_format),
                torch.empty_like(mem_v, memory_format=torch.contiguous_format),
                torch.empty_like(new_k, memory_format=torch.contiguous_format),
                torch.empty_like(new_v, memory_format=torch.contiguous_format),
                torch.empty_like(weight, memory_format=torch.contiguous_format),
                weight.new_empty((weight.shape[0],)),
                torch.empty_like(alpha))

    def _setup_context(ctx, inputs, output):
        (mem_k, mem_v, new_k, new_v, scores, weight, bias, alpha, num_heavy, num_local,
         valid_len) = inputs
        ctx.has_bias = bias is not None
        ctx.num_heavy, ctx.num_local = num_heavy, num_local
        ctx.save_for_backward(mem_k, mem_v, new_k, new_v, scores, weight, bias, alpha, valid_len)

    def _backward(ctx, grad_k, grad_v):
        mem_k, mem_v, new_k, new_v, scores, weight, bias, alpha, valid_len = ctx.saved_tensors
        shape = _out_shape(mem_k, weight, ctx.num_heavy)
        if grad_k is None:
            grad_k = mem_k.new_zeros(shape)
        if grad_v is None:
            grad_v = mem_k.new_zeros(shape)
        grads = torch.ops.lococo.fuse_kv_backward(
            grad_k, grad_v, mem_k, mem_v, new_k, new_v, scores, weight, bias, alpha,
            ctx.num_heavy, ctx.num_local, valid_len)
        d_mem_k, d_mem_v, d_new_k, d_new_v, d_weight, d_bias, d_alpha = grads
        return (d_mem_k, d_mem_v, d_new_k, d_new_v, None, d_weight,
                d_bias if ctx.has_bias else None, d_alpha, None, None, None)

    torch.library.register_autograd("lococo::fuse_kv", _backward, setup_context=_setup_context)


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
    """Compress the cache [mem ; new] of every (row, KV head) into ``num_heavy + C`` slots.

    Runs ``torch.ops.lococo.fuse_kv`` where a compiled kernel exists for the device, else
    ``lococo.reference.fuse_kv``. See docs/design.md#the-compressor and
    docs/design.md#the-op-contract; returns (keys, values), each [b, h, num_heavy + C, d] in
    the dtype of ``mem_k``.
    """
    if _library.has_kernel(mem_k.device):
        return torch.ops.lococo.fuse_kv(mem_k, mem_v, new_k, new_v, scores, weight, bias, alpha,
                                        num_heavy, num_local, valid_len)
    return reference.fuse_kv(mem_k, mem_v, new_k, new_v, scores, weight, bias, alpha, num_heavy,
                             num_local, valid_len)
