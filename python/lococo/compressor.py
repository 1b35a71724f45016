"""The learned part of LoCoCo: one convolution plus a blend scalar per decoder layer."""

from __future__ import annotations

import torch
from torch import nn

from .ops import fuse_kv

__all__ = ["LayerCompressor"]


class LayerCompressor(nn.Module):
    """Conv1d(2d -> C, kernel k, "same" zero padding, bias) and the scalar alpha of one layer.

    Shared by all KV heads of the layer. Initialisation follows the original code: weight
    ~ N(0, init_std), bias 0, alpha = alpha_init (not clamped).
    """

    def __init__(self, head_dim: int, num_fused: int, kernel_size: int = 21,
                 init_std: float = 1.0, alpha_init: float = 0.5, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        if head_dim < 1 or num_fused < 0:
            raise ValueError(f"head_dim must be >= 1 and num_fused >= 0, got {head_dim}, {num_fused}")
        factory = {"device": device, "dtype": dtype}
        self.head_dim, self.num_fused, self.kernel_size = head_dim, num_fused, kernel_size
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(num_fused, 2 * head_dim, kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(num_fused, **factory)) if bias else None
        self.alpha = nn.Parameter(torch.full((), float(alpha_init), **factory))
        self.reset_parameters(alpha_init)

    def reset_parameters(self, alpha_init: float = 0.5) -> None:
        with torch.no_grad():
            self.weight.normal_(0.0, self.init_std)
            if self.bias is not None:
                self.bias.zero_()
            self.alpha.fill_(alpha_init)

    def forward(self, mem_k, mem_v, new_k, new_v, scores, num_heavy: int, num_local: int = 0,
                valid_len: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Compress [mem ; new] into num_heavy + C slots (see ``lococo.fuse_kv``).

        The parameters are cast to the cache's dtype; gradients flow back to them in theirs.
        """
        dtype = mem_k.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return fuse_kv(mem_k, mem_v, new_k, new_v, scores, self.weight.to(dtype), bias,
                       self.alpha.to(dtype), num_heavy, num_local, valid_len)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, num_fused={self.num_fused}, "
                f"kernel_size={self.kernel_size}, bias={self.bias is not None}")
