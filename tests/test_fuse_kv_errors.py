"""Every bad input of SPEC section 4 raises a ValueError that names the argument."""

import re

import pytest
import torch

import lococo
from lococo.ops import library as _library

from conftest import kernel_devices
from fuse_kv_samples import Case, make_args

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
