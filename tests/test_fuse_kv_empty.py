"""Empty batches, heads and head dims: the reference (the fallback without lococo._C) returns what the op does.

The reference used to fail on them with "cannot reshape tensor of 0 elements" where the compiled op
returns an empty result.
"""

import pytest
import torch

import lococo
from lococo import reference
from lococo.ops.testing import DIFF_ARGS, Case, make_args

from conftest import kernel_devices

EMPTY = [
    Case(0, 2, 5, 3, 4, 2, 2, 3, name="no-rows"),
    Case(2, 0, 5, 3, 4, 2, 2, 3, name="no-heads"),
    Case(2, 2, 5, 3, 0, 2, 2, 3, name="head-dim-0"),
    Case(0, 0, 5, 3, 0, 2, 2, 3, name="all-empty"),
    Case(2, 2, 5, 3, 0, 2, 2, 3, valid_len=(8, 3), name="head-dim-0-padded"),
]


def outputs_and_grads(fn, args):
    """(keys, values) and the gradients of their sum in every differentiable input (zeros where unused)."""
    leaves = [a.detach().clone().requires_grad_(i in DIFF_ARGS) if isinstance(a, torch.Tensor) else a
              for i, a in enumerate(args)]
    out = fn(*leaves)
    inputs = [leaves[i] for i in DIFF_ARGS if leaves[i] is not None]
    grads = torch.autograd.grad(sum(t.sum() for t in out), inputs, allow_unused=True)
    return out, [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


@pytest.mark.parametrize("case", EMPTY, ids=str)
def test_the_reference_returns_empty_slots(case):
    args = make_args(case, "cpu", torch.float32)
    (keys, values), grads = outputs_and_grads(reference.fuse_kv, args)
    assert keys.shape == values.shape == case.slots() and keys.dtype == torch.float32
    assert all(g.shape == a.shape and not g.any() for g, a in zip(grads, [args[i] for i in DIFF_ARGS]))


@pytest.mark.skipif(not lococo.compiled(), reason="lococo._C is not built")
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", EMPTY, ids=str)
def test_the_reference_matches_the_compiled_op_on_empty_inputs(case, dtype, device):
    args = make_args(case, device, dtype)
    got, got_grads = outputs_and_grads(torch.ops.lococo.fuse_kv, args)
    want, want_grads = outputs_and_grads(reference.fuse_kv, args)
    for g, w in zip([*got, *got_grads], [*want, *want_grads]):
        assert g.shape == w.shape and g.dtype == w.dtype and g.device == w.device
        torch.testing.assert_close(g, w, rtol=0, atol=0)
