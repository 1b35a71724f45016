"""Sample arguments of fuse_kv and the rule its kernels are verified by (like ``torch.testing``).

One place for what the tests, ``tools/sanitize_case.py`` (on the GPU and in the CPU emulator of
the CUDA kernels) and ``benchmarks/bench_fuse_kv.py`` share:

* ``Case`` and ``make_args``: the positional arguments of ``torch.ops.lococo.fuse_kv`` for odd
  sizes, both cache segments, strided views, tied, NaN and zero scores, left padding;
* ``SAMPLES``: the cases every op test runs; ``EDGE_CASES``, ``MMA_CASES`` and ``MODEL_CASES``:
  the cases of the kernel verification;
* ``compare_forward`` and ``compare_backward``: a result against the float64 reference, with
  the tolerance rule below.

The tolerance rule. The oracle is ``lococo.reference`` run in float64 (never in float32: on
CUDA its convolution would run in TF32). A result may differ from the oracle by at most twice
PyTorch's own error: the error of the same reference run in the result's dtype, which is what a
user of plain PyTorch gets. For gradients, whose reductions run in a different order, one unit
in the last place of the tensor's largest entry is allowed on top (a sum may round to the other
neighbour), and errors are relative to that entry. float64 and float32 results also pass when
they agree element-wise to 1e-9 (float64) or 1e-5 (float32; 1e-4 for gradients), absolute plus
relative, where PyTorch's own error happens to be tiny. The caller keeps TF32 off on CUDA.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from . import reference

__all__ = ["Case", "Comparison", "SAMPLES", "EDGE_CASES", "MMA_CASES", "MODEL_CASES", "DIFF_ARGS",
           "make_args", "upcast", "max_error", "compare_forward", "compare_backward", "reference_grads"]

DIFF_ARGS = (0, 1, 2, 3, 5, 6, 7)  # mem_k, mem_v, new_k, new_v, weight, bias, alpha


@dataclass(frozen=True)
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
    alpha: float = 0.3
    valid_len: tuple[int, ...] | None = None
    layout: str = "contiguous"  # or "strided": new entries as views of a projection, memory sliced
    scores: str = "random"      # or "zeros", "ties" (values 0, 1, 2), "nan" (with -inf, -0 and +0)
    scores_dtype: str = "float32"  # the kernels read scores in their own dtype
    bias_std: float | None = 0.1  # None: no bias
    weight_scale: float = 1.0   # weight std times sqrt(2d k); about 3 gives peaked, finite softmaxes
    nonfinite: bool = False     # a NaN and a -inf in the memory keys, an inf in the new keys
    name: str = ""

    def __str__(self) -> str:
        if self.name:
            return self.name
        return "-".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self) if f.name != "name")

    def slots(self) -> tuple[int, int, int, int]:
        """The shape of each output."""
        return (self.batch, self.heads, self.num_heavy + self.num_fused, self.d)


def _entries(shape, dtype, device, layout, gen, kind):
    """A random tensor of `shape`, as a non-contiguous view when layout is strided."""
    if layout == "contiguous":
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)
    b, h, L, d = shape
    if kind == "new":  # a view of a projection output [b, L, h * d], contiguous along d
        proj = torch.randn(b, L, h * d + 3, generator=gen, dtype=torch.float64).to(device, dtype)
        return proj[..., : h * d].unflatten(-1, (h, d)).transpose(1, 2)
    big = torch.randn(b, h, L + 3, 2 * d, generator=gen, dtype=torch.float64).to(device, dtype)
    return big[:, :, 1 : L + 1, ::2]  # sliced sequence, feature stride 2


def _scores(case: Case, gen) -> torch.Tensor:
    shape = (case.batch, case.heads, case.mem_len + case.new_len)
    if case.scores == "zeros":
        return torch.zeros(shape)
    if case.scores == "ties":
        return torch.randint(0, 3, shape, generator=gen).float()
    scores = torch.rand(shape, generator=gen)
    if case.scores == "nan":
        scores[scores < 0.3] = float("nan")
        if shape[-1] >= 3:
            scores[..., 0], scores[..., 1], scores[..., 2] = float("-inf"), -0.0, 0.0
    elif case.scores != "random":
        raise ValueError(f"unknown scores kind {case.scores!r}")
    return scores


def make_args(case: Case, device, dtype: torch.dtype, seed: int = 0) -> list:
    """Positional arguments of torch.ops.lococo.fuse_kv for `case`, the same for a seed on every device."""
    gen = torch.Generator().manual_seed(seed)
    b, h, la, lb, d = case.batch, case.heads, case.mem_len, case.new_len, case.d
    mem_k = _entries((b, h, la, d), dtype, device, case.layout, gen, "mem")
    mem_v = _entries((b, h, la, d), dtype, device, case.layout, gen, "mem")
    new_k = _entries((b, h, lb, d), dtype, device, case.layout, gen, "new")
    new_v = _entries((b, h, lb, d), dtype, device, case.layout, gen, "new")
    if case.nonfinite:
        if la > 0:
            mem_k[0, 0, la // 2, d - 1] = float("nan")
            mem_k[0, -1, 0, 0] = float("-inf")
        if lb > 0:
            new_k[0, -1, lb // 2, 0] = float("inf")
    scores = _scores(case, gen).to(device, getattr(torch, case.scores_dtype))
    weight = torch.randn(case.num_fused, 2 * d, case.kernel, generator=gen, dtype=torch.float64)
    weight = (weight * case.weight_scale / (2 * d * case.kernel) ** 0.5).to(device, dtype)
    bias = None
    if case.bias_std is not None:
        bias = (case.bias_std * torch.randn(case.num_fused, generator=gen, dtype=torch.float64)).to(device, dtype)
    alpha = torch.tensor(case.alpha, dtype=torch.float64).to(device, dtype)
    valid_len = None if case.valid_len is None else torch.tensor(case.valid_len, device=device)
    return [mem_k, mem_v, new_k, new_v, scores, weight, bias, alpha, case.num_heavy, case.num_local, valid_len]


def upcast(args, dtype: torch.dtype = torch.float64) -> list:
    """The arguments with every float tensor in `dtype` (scores included: they only rank)."""
    return [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest absolute difference; equal infinities and NaN against NaN count as equal."""
    if got.numel() == 0:
        return 0.0
    g, w = got.double(), want.double()
    same = (g == w) | (torch.isnan(g) & torch.isnan(w))
    return (g - w).abs().masked_fill(same, 0).nan_to_num(nan=float("inf")).max().item()


def _scale(t: torch.Tensor) -> float:
    """Largest finite magnitude of t (1 when there is none), the unit of relative errors."""
    finite = t.double().abs().nan_to_num(nan=0.0, posinf=0.0)
    return max(finite.max().item(), 1e-30) if t.numel() else 1.0


def _within_elementwise(got: torch.Tensor, exact: torch.Tensor, tol: float) -> bool:
    g, e = got.double(), exact.double()
    same = (g == e) | (torch.isnan(g) & torch.isnan(e))
    excess = ((g - e).abs() - tol * (1 + e.abs())).masked_fill(same, -1.0).nan_to_num(nan=1.0)
    return bool((excess <= 0).all())


@dataclass
class Comparison:
    """The largest error over the compared tensors (relative to each tensor's largest entry for
    gradients), the same for the reference run in the tested dtype, and the verdict."""

    error: float
    torch_error: float
    ok: bool
    detail: str = ""


def _compare(got, exact, own, dtype, tight: float, ulp: bool, relative: bool, names) -> Comparison:
    error = torch_error = 0.0
    ok, details = True, []
    eps = torch.finfo(dtype).eps
    for name, g, e, o in zip(names, got, exact, own):
        g = g.reshape(e.shape)
        scale = _scale(e) if relative else 1.0
        err, own_err = max_error(g, e) / scale, max_error(o, e) / scale
        error, torch_error = max(error, err), max(torch_error, own_err)
        if g.dtype != dtype:
            ok = False
            details.append(f"{name} has dtype {g.dtype}, not {dtype}")
            continue
        if not torch.equal(torch.isnan(g), torch.isnan(e)):
            ok = False
            details.append(f"{name}: NaN pattern differs")
        twice_torch = err <= 2 * own_err + (eps if ulp else 1e-6)
        if dtype in (torch.float32, torch.float64):
            this_ok = _within_elementwise(g, e, tight) or twice_torch
        else:
            this_ok = twice_torch
        if not this_ok:
            ok = False
            details.append(f"{name}: error {err:.3g} vs torch's own {own_err:.3g}")
    return Comparison(error, torch_error, ok, "; ".join(details))


def compare_forward(got, args) -> Comparison:
    """fuse_kv's (keys, values) for `args` against the float64 reference, by the rule above."""
    dtype = args[0].dtype
    exact = reference.fuse_kv(*upcast(args))
    own = reference.fuse_kv(*args)
    tight = 1e-9 if dtype == torch.float64 else 1e-5
    return _compare(got, exact, own, dtype, tight, ulp=False, relative=False, names=("keys", "values"))


def reference_grads(args, grad_out) -> list[torch.Tensor]:
    """Gradients of the DIFF_ARGS present in `args` (zeros where unused) by the reference's autograd."""
    diff = [i for i in DIFF_ARGS if args[i] is not None]
    leaves = [a.detach().clone().requires_grad_(i in diff) if isinstance(a, torch.Tensor) else a
              for i, a in enumerate(args)]
    out = reference.fuse_kv(*leaves)
    grads = torch.autograd.grad(out, [leaves[i] for i in diff], [g.to(out[0].dtype) for g in grad_out],
                                allow_unused=True)
    return [torch.zeros_like(leaves[i]) if g is None else g for i, g in zip(diff, grads)]


def compare_backward(got, args, grad_out) -> Comparison:
    """Gradients `got` of the DIFF_ARGS present in `args` (in that order) against the float64
    reference's autograd with output gradients `grad_out`, by the rule above."""
    dtype = args[0].dtype
    exact = reference_grads(upcast(args), [g.double() for g in grad_out])
    own = reference_grads(args, grad_out)
    names = [("mem_k", "mem_v", "new_k", "new_v", "", "weight", "bias", "alpha")[i]
             for i in DIFF_ARGS if args[i] is not None]
    tight = 1e-9 if dtype == torch.float64 else 1e-4
    return _compare(got, exact, own, dtype, tight, ulp=True, relative=dtype not in (torch.float32, torch.float64),
                    names=names)


SAMPLES = [  # every op test: no alpha at 0.5 (a swapped blend cancels there), half of them with tied scores
    Case(1, 1, 12, 5, 8, 4, 4, 3, scores="ties"),
    Case(2, 3, 20, 7, 8, 5, 6, 5, num_local=2, layout="strided", alpha=0.7, scores_dtype="bfloat16"),
    Case(3, 2, 33, 0, 16, 7, 9, 7, alpha=1.0, scores="ties"),                        # new segment empty
    Case(2, 2, 0, 29, 12, 6, 5, 5, alpha=0.0),                                       # memory segment empty
    Case(1, 3, 10, 7, 6, 8, 0, 21, alpha=1.0, scores="zeros"),                       # rho = 1, pure conv
    Case(2, 1, 9, 4, 4, 5, 8, 3, layout="strided", alpha=0.85),                      # L = M exactly
    Case(2, 2, 15, 6, 8, 4, 6, 1, alpha=0.25, scores="ties"),                        # k = 1
    Case(2, 2, 14, 3, 8, 0, 9, 3, scores="ties"),                                    # C = 0: pure selection
    Case(3, 2, 25, 8, 8, 6, 7, 5, num_local=3, valid_len=(33, 14, 5), layout="strided", alpha=0.6),
    Case(2, 1, 30, 2, 8, 5, 5, 9, valid_len=(10, 32), scores="ties", alpha=0.4, scores_dtype="float64"),
    Case(1, 2, 18, 6, 8, 5, 6, 5, num_local=6, scores="nan", alpha=0.9, scores_dtype="float16"),  # l = H
    Case(2, 2, 40, 9, 8, 6, 7, 5, num_local=2, valid_len=(49, 30), scores="ties", alpha=0.15),
    Case(1, 3, 145, 0, 64, 64, 64, 21, layout="strided", alpha=0.65),                # SmolLM2 decode shape
]

_SMALL = Case(2, 2, 15, 6, 3, 4, 5, 3, bias_std=1.0, weight_scale=3.0, name="small")
EDGE_CASES = [  # the kernel verification's odd shapes (SIMT forward; d % 8 != 0)
    _SMALL,
    dataclasses.replace(_SMALL, name="strided", layout="strided"),
    dataclasses.replace(_SMALL, name="ties", scores="ties", scores_dtype="float64"),
    dataclasses.replace(_SMALL, name="nan_scores", scores="nan", scores_dtype="float64"),
    dataclasses.replace(_SMALL, name="k1", kernel=1),
    dataclasses.replace(_SMALL, name="L_eq_M", mem_len=5, new_len=4),
    dataclasses.replace(_SMALL, name="mem_empty", mem_len=0, new_len=12),
    dataclasses.replace(_SMALL, name="new_empty", mem_len=12, new_len=0),
    dataclasses.replace(_SMALL, name="local2", num_local=2, scores="ties"),
    dataclasses.replace(_SMALL, name="local_all", num_local=5),
    dataclasses.replace(_SMALL, name="valid_len", valid_len=(21, 7), alpha=0.8),
    dataclasses.replace(_SMALL, name="valid_len0", valid_len=(0, 9)),
    dataclasses.replace(_SMALL, name="rho1_alpha1", num_heavy=0, scores="zeros", alpha=1.0),
    dataclasses.replace(_SMALL, name="alpha0", alpha=0.0),
    dataclasses.replace(_SMALL, name="no_bias", bias_std=None),
    dataclasses.replace(_SMALL, name="C0", num_fused=0),
    dataclasses.replace(_SMALL, name="nonfinite", nonfinite=True),
    dataclasses.replace(_SMALL, name="long_k", mem_len=40, new_len=10, kernel=9, scores="ties"),
    Case(1, 1, 300, 20, 2, 3, 7, 5, weight_scale=3.0, scores_dtype="bfloat16", name="many_tiles"),
]
MMA_CASES = [  # d % 8 == 0: the tensor-core forward; several tiles and slot blocks, C padded
    Case(1, 2, 50, 30, 8, 20, 10, 5, weight_scale=3.0, name="mma_d8"),
    Case(1, 1, 100, 60, 16, 70, 20, 7, num_local=3, layout="strided", weight_scale=3.0, scores="ties",
         scores_dtype="bfloat16", name="mma_d16_multi"),
    Case(2, 1, 90, 10, 8, 17, 9, 3, scores="nan", valid_len=(100, 40), weight_scale=3.0, scores_dtype="float16",
         name="mma_valid_nan"),
    Case(1, 1, 70, 10, 136, 5, 4, 3, weight_scale=3.0, name="mma_d136"),  # 2d > 256: 32 slots per block
    Case(1, 1, 60, 20, 8, 40, 0, 21, scores="zeros", alpha=1.0, weight_scale=3.0, name="mma_rho1"),
    Case(2, 2, 40, 10, 8, 6, 6, 5, nonfinite=True, weight_scale=3.0, name="mma_nonfinite"),
]
MODEL_CASES = [  # model-sized: GPU only (slow in the CPU emulation)
    Case(2, 3, 145, 0, 64, 64, 64, 21, layout="strided", valid_len=(145, 90), weight_scale=3.0,
         name="smollm2_decode"),
    Case(1, 4, 512, 256, 128, 256, 256, 21, layout="strided", weight_scale=3.0, name="llama_prefill"),
    Case(1, 2, 300, 40, 256, 96, 100, 63, weight_scale=3.0, name="d256_k63"),
]
