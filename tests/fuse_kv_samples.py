"""One generator of fuse_kv arguments for every op test: odd sizes, both segments, strided views."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    heads: int
    mem_len: int
    new_len: int
    d: int
    num_fused: int
    num_heavy: int
    kernel: int
    num_local: int = 0
    alpha: float = 0.5
    valid_len: tuple[int, ...] | None = None
    layout: str = "contiguous"  # or "strided": projection-shaped and sliced views
    scores: str = "random"      # or "zeros", "ties", "nan"

    def __str__(self) -> str:
        return "-".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))


CASES = [
    Case(1, 1, 12, 5, 8, 4, 4, 3),
    Case(2, 3, 20, 7, 8, 5, 6, 5, num_local=2, layout="strided"),
    Case(3, 2, 33, 0, 16, 7, 9, 7, alpha=1.0),                            # new segment empty
    Case(2, 2, 0, 29, 12, 6, 5, 5, alpha=0.0),                            # memory segment empty
    Case(1, 3, 10, 7, 6, 8, 0, 21, alpha=1.0, scores="zeros"),            # rho = 1, pure conv
    Case(2, 1, 9, 4, 4, 5, 8, 3, layout="strided"),                       # L = M exactly
    Case(2, 2, 15, 6, 8, 4, 6, 1),                                        # k = 1
    Case(2, 2, 14, 3, 8, 0, 9, 3, alpha=0.3),                             # C = 0: pure selection
    Case(3, 2, 25, 8, 8, 6, 7, 5, num_local=3, valid_len=(33, 14, 5), layout="strided"),
    Case(2, 1, 30, 2, 8, 5, 5, 9, valid_len=(10, 32), scores="ties"),
    Case(1, 2, 18, 6, 8, 5, 6, 5, num_local=6, scores="nan"),             # l = H
    Case(1, 3, 145, 0, 64, 64, 64, 21, layout="strided"),                 # SmolLM2 decode shape
]


def _make(shape, dtype, device, layout, gen, kind):
    """A random tensor of `shape`, as a non-contiguous view when layout is strided."""
    if layout == "contiguous":
        return torch.randn(shape, generator=gen, dtype=torch.float32).to(device, dtype)
    b, h, L, d = shape
    if kind == "new":  # a view of a projection output [b, L, h * d]
        proj = torch.randn(b, L, h * d + 3, generator=gen).to(device, dtype)
        return proj[..., : h * d].unflatten(-1, (h, d)).transpose(1, 2)
    big = torch.randn(b, h, L + 3, 2 * d, generator=gen).to(device, dtype)
    return big[:, :, 1 : L + 1, ::2]  # sliced sequence, feature stride 2


def make_args(case: Case, device, dtype, seed: int) -> tuple:
    """Positional arguments of torch.ops.lococo.fuse_kv for `case`."""
    gen = torch.Generator().manual_seed(seed)
    b, h, la, lb, d = case.batch, case.heads, case.mem_len, case.new_len, case.d
    mem_k = _make((b, h, la, d), dtype, device, case.layout, gen, "mem")
    mem_v = _make((b, h, la, d), dtype, device, case.layout, gen, "mem")
    new_k = _make((b, h, lb, d), dtype, device, case.layout, gen, "new")
    new_v = _make((b, h, lb, d), dtype, device, case.layout, gen, "new")
    L = la + lb
    if case.scores == "zeros":
        scores = torch.zeros(b, h, L)
    elif case.scores == "ties":
        scores = torch.randint(0, 3, (b, h, L), generator=gen).float()
    else:
        scores = torch.rand(b, h, L, generator=gen)
        if case.scores == "nan":
            scores[..., ::4] = float("nan")
    scores = scores.to(device)
    weight = (torch.randn(case.num_fused, 2 * d, case.kernel, generator=gen)
              / (2 * d * case.kernel) ** 0.5).to(device, dtype)
    bias = (0.1 * torch.randn(case.num_fused, generator=gen)).to(device, dtype)
    alpha = torch.tensor(case.alpha).to(device, dtype)
    valid_len = None if case.valid_len is None else torch.tensor(case.valid_len, device=device)
    return (mem_k, mem_v, new_k, new_v, scores, weight, bias, alpha, case.num_heavy,
            case.num_local, valid_len)
