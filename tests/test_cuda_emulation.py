"""The CUDA emulator (tests/cuda_emulation/runtime.h) that the emulated-kernel tests rely on passes its self-test:
exact block reductions under both thread orders, a missing barrier exposed, and an error for each misuse
(divergent barriers, partial-warp shuffles, deadlock, a kernel exception, bad launch parameters)."""
import subprocess

import pytest

import cuda_emulation


@pytest.mark.skipif(not cuda_emulation.compiler_available(), reason="no C++ compiler")
def test_emulator_self_test_passes(tmp_path):
    binary = tmp_path / "selftest"
    source = cuda_emulation.HERE / "selftest.cpp"
    subprocess.run([cuda_emulation.CXX, "-std=c++20", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(binary),
                    str(source)], check=True)
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.rstrip().endswith("ALL OK"), result.stdout
