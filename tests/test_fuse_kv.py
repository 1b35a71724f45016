"""torch.ops.lococo.fuse_kv against lococo.reference: values, gradients, opcheck, compile."""

import pytest
import torch

import lococo
from lococo import reference

from conftest import kernel_devices
from fuse_kv_samples import CASES, Case, make_args

pytestmark = pytest.mark.skipif(not lococo.compiled(), reason="lococo._C is not built")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DIFF_ARGS = (0, 1, 2, 3, 5, 6, 7)  # mem_k, mem_v, new_k, new_v, weight, bias, alpha


def op(*args):
    return torch.ops.lococo.fuse_kv(*args)


def upcast(args, dtype=torch.float32):
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)


def assert_close_to_reference(got, args, label):
    """fp32/fp64: tight. fp16/bf16: the kernel's error against the fp32 reference may be at most
    twice the error of the reference itself run in that dtype (FlashAttention's rule)."""
    dtype = args[0].dtype
    exact = reference.fuse_kv(*upcast(args, torch.float64 if dtype == torch.float64 else torch.float32))
    same_dtype = reference.fuse_kv(*args)
    for name, g, e, s in zip(("keys", "values"), got, exact, same_dtype):
        assert g.dtype == dtype and g.shape == e.shape, label
        assert torch.equal(torch.isnan(g), torch.isnan(e)), f"{name} NaN pattern differs: {label}"
        if dtype in (torch.float32, torch.float64):
            torch.testing.assert_close(g, e.to(dtype), rtol=1e-5, atol=1e-5, equal_nan=True,
                                       msg=lambda m: f"{name} {label}\n{m}")
        else:
            err = (g.float() - e.float()).abs().nan_to_num().max().item()
            own = (s.float() - e.float()).abs().nan_to_num().max().item()
            assert err <= 2 * own + 1e-6, f"{name}: kernel error {err} vs torch's own {own}: {label}"


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_matches_reference(case, dtype, device, seed):
    args = make_args(case, device, dtype, seed)
    assert_close_to_reference(op(*args), args, f"{case} seed={seed}")


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_backward_matches_reference(case, dtype, device, seed):
    args = make_args(case, device, dtype, seed)
    grads = []
    for fn in (op, reference.fuse_kv):
        leaves = [a.detach().clone().requires_grad_(i in DIFF_ARGS) if isinstance(a, torch.Tensor)
                  else a for i, a in enumerate(args)]
        k, v = fn(*leaves)
        gen = torch.Generator().manual_seed(seed)
        gk = torch.randn(k.shape, generator=gen).to(k)
        gv = torch.randn(v.shape, generator=gen).to(v)
        inputs = [leaves[i] for i in DIFF_ARGS]
        grads.append(torch.autograd.grad((k, v), inputs, (gk, gv), allow_unused=True))
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    for i, got, want in zip(DIFF_ARGS, *grads):
        want = torch.zeros_like(args[i]) if want is None else want
        torch.testing.assert_close(got.float(), want.float(), **tol,
                                   msg=lambda m: f"grad of arg {i}, {case} seed={seed}\n{m}")


GRADCHECK_CASES = [c for c in CASES if c.d <= 16 and c.mem_len + c.new_len <= 40]


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=str)
def test_gradcheck_float64(case, device, seed):
    args = list(make_args(case, device, torch.float64, seed))
    for i in DIFF_ARGS:
        args[i] = args[i].detach().requires_grad_()
    assert torch.autograd.gradcheck(op, tuple(args), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[8]], ids=str)
def test_opcheck(case, device, seed):
    args = list(make_args(case, device, torch.float32, seed))
    for i in DIFF_ARGS:
        args[i] = args[i].detach().requires_grad_()
    torch.library.opcheck(torch.ops.lococo.fuse_kv.default, tuple(args))


@pytest.mark.parametrize("device", kernel_devices())
def test_compile_fullgraph_forward_and_backward(device, seed):
    args = list(make_args(CASES[8], device, torch.float32, seed))
    weight = args[5].detach().requires_grad_()

    def step(mem_k, mem_v, new_k, new_v, scores, w, bias, alpha, valid_len):
        k, v = torch.ops.lococo.fuse_kv(mem_k, mem_v, new_k, new_v, scores, w, bias, alpha,
                                        CASES[8].num_heavy, CASES[8].num_local, valid_len)
        return (k * 2).sum() + v.square().sum()

    inputs = (*args[:5], weight, args[6], args[7], args[10])
    eager = step(*inputs)
    (g_eager,) = torch.autograd.grad(eager, weight)
    compiled = torch.compile(step, fullgraph=True)(*inputs)
    (g_compiled,) = torch.autograd.grad(compiled, weight)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g_compiled, g_eager, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic(device, dtype, seed):
    args = list(make_args(CASES[-1], device, dtype, seed))
    for i in DIFF_ARGS:
        args[i] = args[i].detach().requires_grad_()
    runs = []
    for _ in range(2):
        k, v = op(*args)
        grads = torch.autograd.grad((k, v), [args[i] for i in DIFF_ARGS],
                                    (torch.ones_like(k), torch.full_like(v, 0.5)))
        runs.append((k, v, *grads))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", kernel_devices())
def test_nonfinite_values_propagate_without_crashing(device, seed):
    case = Case(1, 2, 20, 4, 8, 5, 6, 5)
    args = list(make_args(case, device, torch.float32, seed))
    args[0] = args[0].clone()
    args[0][0, 0, 3, 1] = float("nan")
    args[2] = args[2].clone()
    args[2][0, 1, 2, 0] = float("inf")
    assert_close_to_reference(op(*args), tuple(args), f"nonfinite seed={seed}")


@pytest.mark.parametrize("device", kernel_devices())
def test_pad_entries_are_never_read(device, seed):
    args = make_args(Case(2, 2, 12, 4, 8, 3, 4, 3, valid_len=(10, 3)), device, torch.float32, seed)
    poisoned = list(args)
    poisoned[0] = args[0].clone()
    poisoned[0][:, :, :6] = float("nan")   # the pad entries of both rows, with the best scores
    poisoned[4] = args[4].clone()
    poisoned[4][..., :6] = 1e9
    for clean, dirty in zip(op(*args), op(*poisoned)):
        assert torch.equal(clean, dirty)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cpu_dft_convolution_matches_reference(case, dtype, seed, monkeypatch):
    """The CPU kernel's DFT-domain convolution (chosen automatically for large layers)."""
    monkeypatch.setenv("LOCOCO_CPU_CONV", "dft")
    args = make_args(case, "cpu", dtype, seed)
    assert_close_to_reference(op(*args), args, f"dft {case} seed={seed}")


def test_cpu_conv_algorithm_setting_is_validated(monkeypatch, seed):
    monkeypatch.setenv("LOCOCO_CPU_CONV", "fast")
    with pytest.raises(RuntimeError, match="LOCOCO_CPU_CONV must be auto, direct or dft"):
        op(*make_args(CASES[0], "cpu", torch.float32, seed))
