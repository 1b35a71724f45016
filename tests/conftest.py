import os
import random

import pytest
import torch

import lococo

# Fresh seeds on every run; set LOCOCO_TEST_SEED to replay one.
SEED = int(os.environ.get("LOCOCO_TEST_SEED", random.randrange(2**31)))


def pytest_report_header(config):
    return (f"lococo {lococo.__version__}, torch {torch.__version__}, kernels on "
            f"{lococo.kernel_devices() or 'no device'}, LOCOCO_TEST_SEED={SEED}")


def kernel_devices() -> list:
    """Devices to test the compiled op on: CPU always, CUDA when a GPU and a kernel exist."""
    devices = [pytest.param("cpu")]
    cuda_ok = torch.cuda.is_available() and lococo.has_kernel("cuda")
    devices.append(pytest.param("cuda", marks=pytest.mark.skipif(
        not cuda_ok, reason="no CUDA device or no CUDA kernel in this build")))
    return devices


@pytest.fixture
def seed(request) -> int:
    """A seed that differs per test and per run, reported on failure."""
    return (SEED + hash(request.node.nodeid)) % (2**31)
