"""`python -m lococo.recipes.showcase`: the fuse_kv op on SmolLM2-shaped inputs, against the reference.

Streams random keys and values of a 3-KV-head, d = 64 layer through a 128-slot cache that
compresses whenever it holds more than M + beta entries (docs/design.md#compression-trigger), with the compiled
kernel and with the PyTorch reference side by side, and prints agreement, time and memory.
"""

from __future__ import annotations

import argparse
import time

import torch

from ..compressor import LayerCompressor
from ..ops import library as _library, reference
from .argtypes import int_at_least, positive_int


def stream(compress, layer, tokens: int, slots: int, beta: int, heads: int, d: int, seed: int):
    """Decode `tokens` random entries one at a time; returns final keys, calls, seconds, peak size."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.empty(1, heads, 0, d)
    values = torch.empty(1, heads, 0, d)
    scores = torch.empty(1, heads, 0)
    calls, seconds, peak = 0, 0.0, 0
    weight, bias, alpha = layer.weight.detach(), layer.bias.detach(), layer.alpha.detach()
    for _ in range(tokens):
        if keys.shape[2] > slots + beta:
            t0 = time.perf_counter()
            keys, values = compress(keys[:, :, :slots], values[:, :, :slots], keys[:, :, slots:],
                                    values[:, :, slots:], scores, weight, bias, alpha,
                                    slots - layer.num_fused, 0, None)
            seconds += time.perf_counter() - t0
            calls += 1
        keys = torch.cat([keys, torch.randn(1, heads, 1, d, generator=gen)], 2)
        values = torch.cat([values, torch.randn(1, heads, 1, d, generator=gen)], 2)
        # stand-in attention scores: a softmax over the stored keys for one random query
        query = torch.randn(1, heads, 1, d, generator=gen)
        scores = torch.softmax(query @ keys.transpose(-1, -2) / d**0.5, -1)[:, :, 0]
        peak = max(peak, keys.shape[2])
    return keys, calls, seconds, peak


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lococo.recipes.showcase", description=__doc__)
    parser.add_argument("--tokens", type=positive_int, default=2048)
    parser.add_argument("--slots", type=int_at_least(2), default=128, help="M (half of them fused)")
    args = parser.parse_args(argv)
    heads, d, beta = 3, 64, 16
    torch.manual_seed(0)
    layer = LayerCompressor(head_dim=d, num_fused=args.slots // 2, kernel_size=21, init_std=0.02)
    print(f"fuse_kv showcase: {args.tokens} tokens through a {args.slots}-slot cache "
          f"({heads} KV heads, d {d}, kernel 21, beta {beta})")
    kernels = {"PyTorch reference": reference.fuse_kv}
    if _library.has_kernel("cpu"):
        kernels["lococo CPU kernel"] = torch.ops.lococo.fuse_kv
    else:
        print(f"  (no compiled kernel: {_library.load_error()})")
    finals = {}
    for name, fn in kernels.items():
        keys, calls, seconds, peak = stream(fn, layer, args.tokens, args.slots, beta, heads, d, seed=1)
        finals[name] = keys
        each = f"{1e3 * seconds / calls:7.3f} ms each" if calls else "none: the stream never exceeded M + beta"
        print(f"  {name:18} {calls} compressions, {each}, at most {peak} entries stored per head")
    full_bytes = 2 * args.tokens * heads * d * 4
    fixed_bytes = 2 * (args.slots + beta + 1) * heads * d * 4
    print(f"  KV memory of this layer: full cache {full_bytes / 1024:.0f} KiB, "
          f"LoCoCo at most {fixed_bytes / 1024:.0f} KiB (flat in the context length)")
    if len(finals) == 2:
        a, b = finals.values()
        print(f"  kernel vs reference after the whole stream: max |diff| = {(a - b).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
