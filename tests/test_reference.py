"""lococo.reference checked from first principles on small cases, and against a brute-force loop."""

import math

import pytest
import torch
import torch.nn.functional as F

import lococo
from lococo import reference
from lococo.ops.testing import SAMPLES, Case, make_args


def cache_of(args):
    mem_k, mem_v, new_k, new_v = args[:4]
    return torch.cat([mem_k, new_k], 2), torch.cat([mem_v, new_v], 2)


def test_alpha_zero_keeps_the_top_m_entries(seed):
    args = make_args(Case(2, 3, 15, 6, 8, 5, 7, 5, alpha=0.0), "cpu", torch.float64, seed)
    keys, values = cache_of(args)
    out_k, out_v = reference.fuse_kv(*args)
    scores = args[4]
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    heavy = order[..., :7].sort(-1).values
    picks = order[..., 7:12].sort(-1).values  # the best C of the rest
    want = torch.cat([heavy, picks], -1).unsqueeze(-1).expand(-1, -1, -1, 8)
    torch.testing.assert_close(out_k, keys.gather(2, want), rtol=0, atol=0)
    torch.testing.assert_close(out_v, values.gather(2, want), rtol=0, atol=0)


def test_pure_convolution_is_softmax_of_relu_conv(seed):
    case = Case(1, 2, 11, 6, 4, 6, 0, 21, alpha=1.0, scores="zeros")
    args = make_args(case, "cpu", torch.float64, seed)
    keys, values = cache_of(args)
    weight, bias = args[5], args[6]
    out_k, out_v = reference.fuse_kv(*args)
    for h in range(2):
        x = torch.cat([keys[0, h], values[0, h]], -1).T              # [2d, L]
        z = F.relu(F.conv1d(x[None], weight, bias, padding=10))[0]  # [C, L]
        p = torch.softmax(z, -1)
        torch.testing.assert_close(out_k[0, h], p @ keys[0, h])
        torch.testing.assert_close(out_v[0, h], p @ values[0, h])
        torch.testing.assert_close(p.sum(-1), torch.ones(6, dtype=torch.float64))


def test_ties_go_to_the_lower_index_and_nan_ranks_lowest():
    scores = torch.tensor([[[1.0, float("nan"), 1.0, 1.0, 2.0, float("nan"), 1.0]]])
    order = reference.rank_order(scores[0], torch.ones(1, 7, dtype=torch.bool))
    assert order.tolist() == [[4, 0, 2, 3, 6, 1, 5]]


def test_recent_entries_are_always_heavy(seed):
    case = Case(1, 1, 20, 0, 4, 3, 6, 3, num_local=4, alpha=0.0)
    args = list(make_args(case, "cpu", torch.float64, seed))
    args[4] = torch.arange(20.0, 0, -1).view(1, 1, 20)  # the oldest entries score highest
    keys, _ = cache_of(args)
    out_k, _ = reference.fuse_kv(*args)
    heavy = [0, 1, 16, 17, 18, 19]                        # the best 2, then the 4 recent ones
    torch.testing.assert_close(out_k[0, 0, :6], keys[0, 0, heavy])


def test_short_rows_keep_their_valid_entries_right_aligned(seed):
    case = Case(2, 2, 9, 3, 4, 3, 4, 3, valid_len=(5, 12))
    args = make_args(case, "cpu", torch.float32, seed)
    keys, values = cache_of(args)
    out_k, out_v = reference.fuse_kv(*args)
    assert torch.equal(out_k[0, :, :2], torch.zeros(2, 2, 4))
    assert torch.equal(out_k[0, :, 2:], keys[0, :, 7:])
    assert torch.equal(out_v[0, :, 2:], values[0, :, 7:])
    full = reference.fuse_kv(*[a[1:] if isinstance(a, torch.Tensor) and a.dim() > 0 and i != 5
                               and i != 6 else a for i, a in enumerate(args[:10])])
    torch.testing.assert_close(out_k[1:], full[0])        # the full row is unaffected by row 0


def test_pad_entries_never_reach_the_slots(seed):
    case = Case(1, 2, 12, 4, 4, 3, 4, 3, valid_len=(10,))
    args = list(make_args(case, "cpu", torch.float32, seed))
    poisoned = list(args)
    poisoned[0] = args[0].clone()
    poisoned[0][:, :, :6] = float("nan")                  # the 6 pad entries
    poisoned[4] = args[4].clone()
    poisoned[4][..., :6] = 1e9                            # with the best scores
    for a, b in zip(reference.fuse_kv(*args), reference.fuse_kv(*poisoned)):
        torch.testing.assert_close(a, b)


def test_layer_compressor_initialisation_and_dtype_cast():
    torch.manual_seed(0)
    layer = lococo.LayerCompressor(head_dim=16, num_fused=32, kernel_size=7, init_std=0.5)
    assert layer.weight.shape == (32, 32, 7) and layer.alpha.item() == 0.5
    assert torch.equal(layer.bias, torch.zeros(32))
    assert abs(layer.weight.std().item() - 0.5) < 0.02
    with torch.no_grad():  # a bias and an alpha that no symmetry hides
        layer.bias.normal_(0.0, 0.3)
        layer.alpha.fill_(0.8)
    x = torch.randn(1, 2, 40, 16, dtype=torch.bfloat16)
    scores = torch.rand(1, 2, 40)
    k, v = layer(x, x, x[:, :, :0], x[:, :, :0], scores, num_heavy=8)
    assert k.dtype == torch.bfloat16 and k.shape == (1, 2, 40, 16)
    grad_k, grad_v = torch.randn(k.shape), torch.randn(v.shape)
    torch.autograd.backward((k, v), (grad_k.to(k.dtype), grad_v.to(v.dtype)))
    params = (layer.weight, layer.bias, layer.alpha)
    assert all(p.grad.dtype == torch.float32 for p in params)

    # The same gradients in float64, with the parameters rounded to bfloat16 as the layer casts
    # them: the layer's may differ by bfloat16's rounding of the outputs and gradients only.
    exact = [p.detach().to(torch.bfloat16).double().requires_grad_() for p in params]
    xd = x.double()
    ek, ev = reference.fuse_kv(xd, xd, xd[:, :, :0], xd[:, :, :0], scores, exact[0], exact[1], exact[2], 8)
    torch.autograd.backward((ek, ev), (grad_k.to(torch.bfloat16).double(), grad_v.to(torch.bfloat16).double()))
    for p, e in zip(params, exact):
        scale = e.grad.abs().max().item()
        torch.testing.assert_close(p.grad.double(), e.grad, rtol=0, atol=4 * torch.finfo(torch.bfloat16).eps * scale)

def brute_force_row(keys, values, scores, weight, bias, alpha, num_heavy, num_local, num_valid):
    """One row of the algorithm written out with Python loops, independent of the reference:
    keys/values [L, d] and scores [L] in float64; the last num_valid entries are valid."""
    L, d = keys.shape
    C, _, k = weight.shape
    M = num_heavy + C
    start = L - num_valid
    if num_valid < M:  # kept whole, right-aligned, zeros in front
        out_k, out_v = torch.zeros(M, d, dtype=keys.dtype), torch.zeros(M, d, dtype=keys.dtype)
        if num_valid:
            out_k[M - num_valid:], out_v[M - num_valid:] = keys[start:], values[start:]
        return out_k, out_v
    s = scores.tolist()

    def rank(i):  # larger score first, NaN last, ties to the lower position
        return (math.isnan(s[i]), 0.0 if math.isnan(s[i]) else -s[i], i)

    local = list(range(L - num_local, L))
    candidates = sorted(range(start, L - num_local), key=rank)
    heavy = sorted(candidates[: num_heavy - num_local] + local)
    rest = [i for i in range(start, L) if i not in heavy]
    picks = sorted(sorted(range(len(rest)), key=lambda j: rank(rest[j]))[:C])
    if C == 0:
        return keys[heavy], values[heavy]
    x = torch.cat([keys[rest], values[rest]], 1)  # [n, 2d]
    n, pad = len(rest), (k - 1) // 2
    z = torch.empty(C, n, dtype=torch.float64)
    for c in range(C):
        for i in range(n):
            acc = 0.0 if bias is None else float(bias[c])
            for t in range(k):
                if 0 <= i + t - pad < n:
                    acc += float((weight[c, :, t] * x[i + t - pad]).sum())
            z[c, i] = max(acc, 0.0)
    fused = alpha * torch.softmax(z, -1) @ x + (1 - alpha) * x[picks]
    return torch.cat([keys[heavy], fused[:, :d]]), torch.cat([values[heavy], fused[:, d:]])


@pytest.mark.parametrize("case", [c for c in SAMPLES if c.d <= 16], ids=str)
def test_reference_matches_a_brute_force_loop(case, seed):
    """Every small sample (ties, NaN scores, local windows, valid_len, 0 < alpha < 1, a bias)."""
    args = make_args(case, "cpu", torch.float64, seed)
    out_k, out_v = reference.fuse_kv(*args)
    keys, values = cache_of(args)
    L = keys.shape[2]
    for b in range(case.batch):
        num_valid = L if case.valid_len is None else case.valid_len[b]
        for h in range(case.heads):
            want_k, want_v = brute_force_row(keys[b, h], values[b, h], args[4][b, h].double(), args[5], args[6],
                                             float(args[7]), case.num_heavy, case.num_local, num_valid)
            torch.testing.assert_close(out_k[b, h], want_k, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(out_v[b, h], want_v, rtol=1e-10, atol=1e-10)
