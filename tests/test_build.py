"""The compiled extension is built as setup.py promises: CPU kernels always, CUDA kernels when nvcc is there."""
import os
import shutil

import pytest
import torch

from structtoken_d2 import ops

OPS = ["slice_attention", "depthwise_projection"]
EXTENSION_EXPECTED = shutil.which(os.environ.get("CXX", "c++")) is not None and os.environ.get("STRUCTTOKEN_D2_NO_EXTENSION") != "1"
CUDA_EXPECTED = EXTENSION_EXPECTED and os.environ.get("FORCE_CUDA") != "0" and shutil.which("nvcc") is not None


def _registered(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"structtoken::{op}", key)


@pytest.mark.skipif(not EXTENSION_EXPECTED, reason="no C++ compiler: pure-Python install")
@pytest.mark.parametrize("op", OPS)
def test_cpu_kernels_built_and_registered(op):
    assert ops.EXTENSION_ERROR is None, f"structtoken_d2._C failed to import: {ops.EXTENSION_ERROR}; run `make setup`"
    assert _registered(op, "CPU")
    assert ops.active_implementation("cpu") == "compiled-cpu"


@pytest.mark.skipif(not CUDA_EXPECTED, reason="no nvcc, or FORCE_CUDA=0: CPU-only build")
@pytest.mark.parametrize("op", OPS)
def test_cuda_kernels_compiled_and_registered(op):
    # Registration happens when the library loads, GPU or not: this proves the .cu files were compiled in.
    assert ops.EXTENSION_ERROR is None, f"structtoken_d2._C failed to import: {ops.EXTENSION_ERROR}; run `make setup`"
    assert _registered(op, "CUDA")


def test_environment_variable_forces_pytorch(monkeypatch):
    monkeypatch.setenv(ops.FORCE_PYTORCH_ENV, "1")
    assert ops.active_implementation("cpu") == "pytorch"
    assert ops.active_implementation("cuda") == "pytorch"
