"""Every bad input of the op raises a ValueError that names the argument, on every entry point."""

import re

import pytest
import torch

import lococo
from lococo.ops import library as _library
from lococo.ops.testing import Case, make_args

from conftest import kernel_devices

CASE = Case(2, 3, 10, 4, 8, 4, 5, 3, num_local=1, valid_len=(14, 7))


def with_arg(args, index, value):
    args = list(args)
    args[index] = value
    return tuple(args)


BAD = {
    "mem_k rank": (lambda a: with_arg(a, 0, a[0][0]), "mem_k must have rank 4"),
    "new_v rank": (lambda a: with_arg(a, 3, a[3][..., 0]), "new_v must have rank 4"),
    "mem_v shape": (lambda a: with_arg(a, 1, a[1][:, :2]), "mem_v must have the shape of mem_k"),
    "new_k heads": (lambda a: with_arg(a, 2, a[2][:, :2]), "new_k must be"),
    "new_v shape": (lambda a: with_arg(a, 3, a[3][:, :, :2]), "new_v must have the shape of new_k"),
    "d mismatch": (lambda a: with_arg(a, 2, a[2][..., :4]), "new_k must be"),
    "mem_v dtype": (lambda a: with_arg(a, 1, a[1].double()), "mem_v has dtype"),
    "int keys": (lambda a: with_arg(with_arg(with_arg(with_arg(a, 0, a[0].int()), 1, a[1].int()),
                                             2, a[2].int()), 3, a[3].int()), "mem_k must be float32"),
    "scores shape": (lambda a: with_arg(a, 4, a[4][..., 1:]), "scores must be"),
    "scores dtype": (lambda a: with_arg(a, 4, a[4].long()), "scores must be a float tensor"),
    "weight rank": (lambda a: with_arg(a, 5, a[5][..., 0]), "weight must have rank 3"),
    "weight channels": (lambda a: with_arg(a, 5, a[5][:, :5]), "weight must have 2d = 16"),
    "even kernel": (lambda a: with_arg(a, 5, a[5][..., :2]), "kernel size must be odd"),
    "weight dtype": (lambda a: with_arg(a, 5, a[5].double()), "weight has dtype"),
    "bias shape": (lambda a: with_arg(a, 6, a[6][:2]), "bias must be [4]"),
    "bias dtype": (lambda a: with_arg(a, 6, a[6].half()), "bias has dtype"),
    "alpha shape": (lambda a: with_arg(a, 7, a[7].expand(2)), "alpha must be a 0-d or 1-element"),
    "alpha dtype": (lambda a: with_arg(a, 7, a[7].double()), "alpha has dtype"),
    "too many slots": (lambda a: with_arg(a, 8, 11), "num_heavy + C = 15 slots exceed"),
    "num_heavy near INT64_MAX": (lambda a: with_arg(a, 8, 2**63 - 1), "slots exceed the La + Lb = 14"),
    "negative heavy": (lambda a: with_arg(with_arg(a, 8, -1), 9, 0), "num_heavy must be >= 0"),
    "local above heavy": (lambda a: with_arg(a, 9, 6), "num_local must be in [0, num_heavy = 5]"),
    "valid_len dtype": (lambda a: with_arg(a, 10, a[10].int()), "valid_len must be int64"),
    "valid_len shape": (lambda a: with_arg(a, 10, a[10][:1]), "valid_len must be [2]"),
    "valid_len range": (lambda a: with_arg(a, 10, a[10] + 1), "valid_len entries must be in [0, La + Lb = 14]"),
    "valid_len negative": (lambda a: with_arg(a, 10, a[10] - 8), "valid_len entries must be in"),
}

ENTRY_POINTS = {
    "torch.ops": lambda *a: torch.ops.lococo.fuse_kv(*a),
    "reference fallback": lambda *a: lococo.fuse_kv(*a),
    "lococo.reference": lambda *a: lococo.reference.fuse_kv(*a),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("bad", BAD)
def test_bad_input_names_the_argument(bad, entry, monkeypatch, seed):
    if entry == "torch.ops" and not lococo.compiled():
        pytest.skip("lococo._C is not built")
    if entry == "reference fallback":
        monkeypatch.setattr(_library, "has_kernel", lambda device: False)
    args = make_args(CASE, "cpu", torch.float32, seed)
    ENTRY_POINTS[entry](*args)  # the unmodified arguments are fine
    mutate, message = BAD[bad]
    with pytest.raises(ValueError, match="fuse_kv: .*" + re.escape(message)):
        ENTRY_POINTS[entry](*mutate(args))


@pytest.mark.parametrize("device", kernel_devices())
def test_mixed_devices_are_refused(device, seed):
    if device == "cpu" and not torch.cuda.is_available():
        pytest.skip("needs a second device type")
    args = make_args(CASE, device, torch.float32, seed)
    other = "cpu" if device == "cuda" else "cuda"
    with pytest.raises(ValueError, match="fuse_kv: weight is on"):
        torch.ops.lococo.fuse_kv(*with_arg(args, 5, args[5].to(other)))


def test_reference_refuses_more_slots_than_entries(seed):
    """It used to return 23 slots for num_heavy = 20 over 12 entries."""
    args = make_args(Case(1, 1, 8, 4, 4, 3, 5, 3), "cpu", torch.float32, seed)
    with pytest.raises(ValueError, match=re.escape("fuse_kv: num_heavy + C = 23 slots exceed the La + Lb = 12")):
        lococo.reference.fuse_kv(*with_arg(args, 8, 20))


@pytest.mark.skipif(not (torch.cuda.is_available() and lococo.has_kernel("cuda")), reason="needs the CUDA kernels")
def test_cuda_32_bit_index_limit_is_a_value_error():
    """2^31 entries (stride-0 views: no memory) exceed the kernels' 32-bit positions.
    tools/emulator/check_emulated.py checks the same on the CPU emulation of the kernels."""
    L = 2**31
    entries = torch.zeros(1, 1, 1, 1, device="cuda").expand(1, 1, L, 1)
    empty = torch.zeros(1, 1, 0, 1, device="cuda")
    scores = torch.zeros(1, device="cuda").expand(1, 1, L)
    weight = torch.zeros(1, 2, 1, device="cuda")
    with pytest.raises(ValueError, match="32-bit integers"):
        torch.ops.lococo.fuse_kv(entries, entries, empty, empty, scores, weight, None,
                                 torch.tensor(0.5, device="cuda"), 1, 0, None)
