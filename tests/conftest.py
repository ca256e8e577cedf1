"""Fixtures shared by the op tests."""
import pytest

import cuda_emulation


@pytest.fixture(scope="session")
def emulated_cuda_ops():
    """``torch.ops.structtoken_emulated``: the CUDA kernels of ``csrc/cuda`` run on the CPU (see cuda_emulation)."""
    if not cuda_emulation.compiler_available():
        pytest.skip(f"no C++ compiler ({cuda_emulation.CXX}) to build the CUDA emulation")
    return cuda_emulation.load()
