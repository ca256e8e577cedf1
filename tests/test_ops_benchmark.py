"""tools/benchmark_ops.py: the CPU smoke run reports every op, implementation and mode; a missing
extension stops it with a message that says how to build it. (tools/gpu_checks.sh: tests/test_gpu_checks.py.)"""
import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

import structtoken_d2  # noqa: F401  (compat shims before any detectron2 import)
from structtoken_d2 import ops

TOOL = Path(__file__).resolve().parents[1] / "tools" / "benchmark_ops.py"


@pytest.fixture(scope="module")
def benchmark_ops():
    spec = importlib.util.spec_from_file_location("benchmark_ops", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif("cpu" not in ops.COMPILED_DEVICE_TYPES, reason="structtoken_d2._C is not built")
def test_cpu_smoke_run_covers_every_case(benchmark_ops, tmp_path):
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    args = ["--device", "cpu", "--smoke", "--no-compile", "--iters", "1", "--warmup", "0",
            "--json", str(out_json), "--markdown", str(out_md)]
    assert benchmark_ops.main(args) == 0
    rows = json.loads(out_json.read_text())["rows"]
    seen = {(r["op"], r["mode"], r["impl"]) for r in rows}
    for mode in ("fwd", "fwd+bwd"):
        for impl in ("kernel", "eager", "sdpa"):
            assert ("slice_attention", mode, impl) in seen
        for impl in ("kernel", "eager"):
            assert ("depthwise_projection", mode, impl) in seen
    for impl in ("kernel", "eager"):
        assert ("StructTokenHead train step", "fwd+loss+bwd", impl) in seen
        assert ("DepthwiseProjection module", "fwd+bwd", impl) in seen
    assert all(r["median_us"] > 0 and r["device"].startswith("CPU") for r in rows)
    assert all(r["speedup_vs_eager"] == 1.0 for r in rows if r["impl"] == "eager")
    assert out_md.read_text().startswith("**CPU figures (median process CPU time, interleaved rounds): not GPU performance.**")


@pytest.mark.parametrize("clock", ["process", "wall"])
def test_cpu_rows_are_timed_by_the_chosen_clock(benchmark_ops, clock):
    # A call that sleeps 30 ms: 30 ms of wall time, next to no CPU time.
    cases = [benchmark_ops.Case("sleep", "p", "s", "fwd", impl, lambda: time.sleep(0.03))
             for impl in ("kernel", "eager")]
    roofline = benchmark_ops.device_roofline(torch.device("cpu"), torch.float32, None, None)
    rows = benchmark_ops.measure(cases, torch.device("cpu"), torch.float32, roofline, 3, 0, cpu_clock=clock)
    for row in rows:
        assert (row.median_us >= 30000) if clock == "wall" else (row.median_us < 10000)


def test_missing_extension_exits_with_build_instructions(benchmark_ops, monkeypatch):
    monkeypatch.setattr(ops, "COMPILED_DEVICE_TYPES", frozenset())
    with pytest.raises(SystemExit, match="no compiled structtoken ops for cpu .*setup.py build_ext --inplace"):
        benchmark_ops.main(["--device", "cpu", "--smoke"])


def test_bandwidth_roofline_matches_the_h100_sxm_datasheet():
    from structtoken_d2.ops.timing import derived_gbps

    # H100 SXM5: HBM3 at 2619 MHz on a 5120-bit bus; NVIDIA's datasheet says 3.35 TB/s.
    assert derived_gbps("NVIDIA H100 80GB HBM3", 2_619_000, 5120) == pytest.approx(3350, rel=0.01)
    # A driver that reports no memory clock (CUDA 13 removed it from cudaDeviceProp): the datasheet table.
    assert derived_gbps("NVIDIA H100 80GB HBM3", 0, 0) == pytest.approx(3350, rel=0.01)
    assert derived_gbps("NVIDIA H100 PCIe", 0, 0) == pytest.approx(2000, rel=0.01)
    assert derived_gbps("Some Future GPU", 0, 0) is None
