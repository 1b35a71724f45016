"""torch.ops.lococo.fuse_kv against lococo.reference in float64: values, gradients, opcheck, compile."""

import pytest
import torch

import lococo
from lococo.ops.testing import DIFF_ARGS, SAMPLES, Case, compare_backward, compare_forward, make_args, upcast

from conftest import kernel_devices

pytestmark = pytest.mark.skipif(not lococo.compiled(), reason="lococo._C is not built")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.fixture(autouse=True)
def no_tf32():
    """The float64 oracle does not need it, but a float32 reference on CUDA would run in TF32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def op(*args):
    return torch.ops.lococo.fuse_kv(*args)


def assert_close_to_reference(got, args, label):
    """The rule of lococo.ops.testing: float64 oracle, at most twice PyTorch's own error."""
    result = compare_forward(got, args)
    assert result.ok, f"{result.detail}: {label}"


def grads_of(fn, args, grad_out):
    leaves = [a.detach().clone().requires_grad_(i in DIFF_ARGS) if isinstance(a, torch.Tensor) else a
              for i, a in enumerate(args)]
    out = fn(*leaves)
    inputs = [leaves[i] for i in DIFF_ARGS if leaves[i] is not None]
    grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def random_grad_out(case, device, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(case.slots(), generator=gen).to(device, dtype) for _ in range(2)]


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SAMPLES, ids=str)
def test_forward_matches_reference(case, dtype, device, seed):
    args = make_args(case, device, dtype, seed)
    assert_close_to_reference(op(*args), args, f"{case} seed={seed}")


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", SAMPLES, ids=str)
def test_backward_matches_reference(case, dtype, device, seed):
    """Every gradient against the float64 reference's autograd, at most twice PyTorch's own error."""
    args = make_args(case, device, dtype, seed)
    grad_out = random_grad_out(case, device, dtype, seed)
    result = compare_backward(grads_of(op, args, grad_out), args, grad_out)
    assert result.ok, f"{result.detail}: {case} seed={seed}"


GRADCHECK_CASES = [c for c in SAMPLES if c.d <= 16 and c.mem_len + c.new_len <= 40]


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=str)
def test_gradcheck_float64(case, device, seed):
    args = list(make_args(case, device, torch.float64, seed))
    for i in DIFF_ARGS:
        args[i] = args[i].detach().requires_grad_()
    assert torch.autograd.gradcheck(op, tuple(args), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("case", [SAMPLES[1], SAMPLES[4], SAMPLES[8]], ids=str)
def test_opcheck(case, device, seed):
    args = list(make_args(case, device, torch.float32, seed))
    for i in DIFF_ARGS:
        args[i] = args[i].detach().requires_grad_()
    torch.library.opcheck(torch.ops.lococo.fuse_kv.default, tuple(args))


@pytest.mark.parametrize("device", kernel_devices())
def test_compile_fullgraph_forward_and_backward(device, seed):
    args = list(make_args(SAMPLES[8], device, torch.float32, seed))
    weight = args[5].detach().requires_grad_()

    def step(mem_k, mem_v, new_k, new_v, scores, w, bias, alpha, valid_len):
        k, v = torch.ops.lococo.fuse_kv(mem_k, mem_v, new_k, new_v, scores, w, bias, alpha,
                                        SAMPLES[8].num_heavy, SAMPLES[8].num_local, valid_len)
        return (k * 2).sum() + v.square().sum()

    inputs = (*args[:5], weight, args[6], args[7], args[10])
    eager = step(*inputs)
    (g_eager,) = torch.autograd.grad(eager, weight)
    compiled = torch.compile(step, fullgraph=True)(*inputs)
    (g_compiled,) = torch.autograd.grad(compiled, weight)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g_compiled, g_eager, rtol=1e-5, atol=1e-4)
    exact_inputs = upcast(inputs)  # and both against the float64 reference, independently
    exact_weight = exact_inputs[5].detach().requires_grad_()
    exact_inputs[5] = exact_weight
    k, v = lococo.reference.fuse_kv(*exact_inputs[:8], SAMPLES[8].num_heavy, SAMPLES[8].num_local,
                                    exact_inputs[8])
    exact = (k * 2).sum() + v.square().sum()
    (g_exact,) = torch.autograd.grad(exact, exact_weight)
    torch.testing.assert_close(compiled.double(), exact, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g_compiled.double(), g_exact, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic(device, dtype, seed):
    args = list(make_args(SAMPLES[-1], device, dtype, seed))
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
    clean = op(*args)
    assert_close_to_reference(clean, args, f"unpoisoned seed={seed}")
    for want, dirty in zip(clean, op(*poisoned)):
        assert torch.equal(want, dirty)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SAMPLES, ids=str)
def test_cpu_dft_convolution_matches_reference(case, dtype, seed, monkeypatch):
    """The CPU kernel's DFT-domain convolution (chosen automatically for large layers)."""
    monkeypatch.setenv("LOCOCO_CPU_CONV", "dft")
    args = make_args(case, "cpu", dtype, seed)
    assert_close_to_reference(op(*args), args, f"dft {case} seed={seed}")


def test_cpu_conv_algorithm_setting_is_validated(monkeypatch, seed):
    monkeypatch.setenv("LOCOCO_CPU_CONV", "fast")
    with pytest.raises(RuntimeError, match="LOCOCO_CPU_CONV must be auto, direct or dft"):
        op(*make_args(SAMPLES[0], "cpu", torch.float32, seed))


@pytest.mark.parametrize("device", kernel_devices())
def test_in_place_weight_updates_are_seen(device, seed):
    """The CUDA launcher keeps rearranged weights between calls; an optimizer step must show."""
    args = make_args(SAMPLES[-1], device, torch.bfloat16, seed)
    assert_close_to_reference(op(*args), args, "before the update")
    with torch.no_grad():
        args[5].mul_(-1.5)
        args[6].add_(0.25)
    assert_close_to_reference(op(*args), args, "after an in-place update")
    args[5] = args[5].clone()  # a new tensor, perhaps at the same address
    assert_close_to_reference(op(*args), args, "a new weight tensor")


@pytest.mark.skipif(not (torch.cuda.is_available() and lococo.has_kernel("cuda")), reason="needs the CUDA kernels")
def test_cuda_graph_capture_and_replay(seed):
    """No host sync is left in the op: it captures into a CUDA graph, and replays follow new inputs."""
    args = make_args(SAMPLES[8], "cuda", torch.bfloat16, seed)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        op(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op(*args)
    fresh = make_args(SAMPLES[8], "cuda", torch.bfloat16, seed + 1)
    for static, new in zip(args, fresh):
        if isinstance(static, torch.Tensor) and static.is_floating_point():
            static.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    assert_close_to_reference(out, args, "replayed on new inputs")
    for a, b in zip(out, op(*args)):
        assert torch.equal(a, b)


@pytest.mark.xfail(strict=True, reason="open: the CPU backward of the SmolLM2 decode shape takes another path than the "
                                       "reference for this seed (weight error 0.05 against torch's own 5e-6); the "
                                       "forward matches. Found by the random-seed test; remove the mark when fixed.")
def test_backward_of_the_decode_shape_at_a_seed_that_fails():
    case = SAMPLES[12]
    args = make_args(case, "cpu", torch.float32, 1435829093)
    grad_out = random_grad_out(case, "cpu", torch.float32, 1435829093)
    result = compare_backward(grads_of(op, args, grad_out), args, grad_out)
    assert result.ok, result.detail
