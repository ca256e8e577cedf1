"""tools/gpu_checks.sh: its dry run on the CPU runs every step and leaves a summary row per step; without a GPU
the real run refuses; tools/gpu_checks_summary.py keeps the summary and judges a step by its figures;
tools/gpu_check_train.py reads a run's metrics."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tiny_runs import REPO, load_tool

SCRIPT = REPO / "tools" / "gpu_checks.sh"
#: Every step of the script, in order, and its status in a dry run on a CPU machine.
DRY_RUN_STATUSES = {
    "wheels": "skipped", "device": "passed", "build": "skipped", "cuda_tests": "skipped", "memcheck": "skipped",
    "racecheck": "skipped", "synccheck": "skipped", "head_bf16": "passed", "train_amp": "passed",
    "launch_nccl": "skipped", "bench_ops": "passed", "batched_eval": "passed", "bench_model": "passed",
    "bench_model_compile": "skipped",
}


def run_script(*args, timeout=600):
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, env={**os.environ, "PYTHON": sys.executable})


@pytest.fixture(scope="module")
def summary():
    return load_tool("gpu_checks_summary")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run's statuses are those of a machine without a GPU")
def test_dry_run_leaves_a_row_per_step_with_figures_and_reasons(tmp_path):
    out = tmp_path / "dry"
    result = run_script("--dry-run", out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((out / "summary.json").read_text())
    assert data["mode"] == "dry-run"
    steps = {s["name"]: s for s in data["steps"]}
    assert [s["name"] for s in data["steps"]] == list(DRY_RUN_STATUSES)
    assert {name: s["status"] for name, s in steps.items()} == DRY_RUN_STATUSES, result.stdout[-3000:]
    for name, step in steps.items():
        assert step["seconds"] is not None and (out / f"{name}.log").exists()
        if step["status"] == "skipped":
            assert step["reason"], name
        else:
            assert step["figures"], name
    tests = steps["cuda_tests"]["figures"]
    assert tests["tests"] > 50 and tests["skipped"] == tests["tests"]  # the selection found the CUDA tests
    train = steps["train_amp"]["figures"]
    assert train["kernels: loss finite"] is True and train["pytorch-ops: ops"] == "pytorch"
    assert math.isfinite(train["kernels speed-up over pytorch-ops"])
    head = steps["head_bf16"]["figures"]
    assert all(math.isfinite(head[f"{v}: error kernels"]) for v in ("CSE", "SSE", "PWE"))
    assert "slice_attention fwd+bwd: slowest vs eager" in steps["bench_ops"]["figures"]
    assert len(steps["batched_eval"]["figures"]) == 4  # TEST.SLIDE_BATCH 1, 4, 8, 16
    assert "torchrun" in (out / "launch_nccl.log").read_text()  # its command was built
    markdown = (out / "summary.md").read_text()
    assert all(f"| {name}: " in markdown for name in DRY_RUN_STATUSES)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_run_refuses_without_a_gpu(tmp_path):
    result = run_script(tmp_path / "out", timeout=120)
    assert result.returncode == 1
    assert "torch sees no GPU" in result.stderr and "--dry-run" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing was built, run or written


def test_an_earlier_run_is_never_overwritten(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    result = run_script("--dry-run", tmp_path, timeout=60)
    assert result.returncode == 1 and "already holds a run" in result.stderr
    assert (tmp_path / "summary.json").read_text() == "{}" and len(list(tmp_path.iterdir())) == 1


# ------------------------------------------------------------------------------ tools/gpu_checks_summary.py
def init(summary, out, *names):
    steps = [x for name in names for x in ("--step", name, "10", "20", f"the {name} step")]
    assert summary.main(["init", str(out), "--mode", "gpu", "--budget", "540", *steps]) == 0


def row(out, name):
    return next(s for s in json.loads((out / "summary.json").read_text())["steps"] if s["name"] == name)


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="0"
skipped="{skipped}" tests="3"><testcase classname="tests.test_ops_x" name="test_a[1x2-float32]" time="0.1"/>
<testcase classname="tests.test_ops_x" name="test_b" time="0.1"/><testcase classname="tests.test_ops_y"
name="test_c" time="0.1"/></testsuite></testsuites>"""


def test_a_cut_off_run_leaves_rows_not_run_and_the_markdown_says_so(summary, tmp_path):
    init(summary, tmp_path, "first", "second")
    (tmp_path / "first.json").write_text(json.dumps({"error": 0.5, "ops": "compiled-cuda", "problems": []}))
    summary.main(["record", str(tmp_path), "first", "--status", "passed", "--seconds", "12",
                  "--figures", f"json:{tmp_path / 'first.json'}"])
    assert row(tmp_path, "first")["status"] == "passed" and row(tmp_path, "first")["figures"] == {
        "error": 0.5, "ops": "compiled-cuda"}
    assert row(tmp_path, "second")["status"] == "not run" and row(tmp_path, "second")["seconds"] is None
    markdown = (tmp_path / "summary.md").read_text()
    assert "| first: the first step | passed | 12 (10) | error: 0.5<br>ops: compiled-cuda |" in markdown
    assert "| second: the second step | not run | - (10) |" in markdown
    assert summary.main(["finish", str(tmp_path)]) == 1  # a step not run: not a success
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]  # written through temporary files


@pytest.mark.parametrize("skipped, expect, status", [
    (0, "run", "passed"), (1, "run", "failed"), (3, "skipped", "skipped"), (2, "skipped", "failed")])
def test_tests_skipped_where_they_had_to_run_fail_the_step(summary, tmp_path, skipped, expect, status):
    init(summary, tmp_path, "tests")
    (tmp_path / "tests.xml").write_text(JUNIT.format(skipped=skipped))
    summary.main(["record", str(tmp_path), "tests", "--status", "skipped" if expect == "skipped" else "passed",
                  "--seconds", "5", "--figures", f"junit:{tmp_path / 'tests.xml'}", "--expect-tests", expect])
    step = row(tmp_path, "tests")
    assert step["status"] == status and step["figures"]["skipped"] == skipped and step["figures"]["tests"] == 3
    assert (status == "failed") == bool(step["reason"])
    assert summary.main(["finish", str(tmp_path)]) == (1 if status == "failed" else 0)  # its only step


@pytest.mark.parametrize("log, status, errors", [
    ("========= ERROR SUMMARY: 0 errors\n", "passed", 0),
    ("========= Invalid __global__ read\n========= ERROR SUMMARY: 2 errors\n", "failed", 2),
    ("========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)\n", "failed", 1),
    ("1 passed in 3.2s\n", "failed", None),  # no summary line: the sanitizer did not check anything
])
def test_sanitizer_errors_fail_the_step(summary, tmp_path, log, status, errors):
    init(summary, tmp_path, "memcheck")
    (tmp_path / "memcheck.log").write_text("tests/test_ops_x.py .\n" + log)
    summary.main(["record", str(tmp_path), "memcheck", "--status", "passed", "--seconds", "30",
                  "--figures", f"sanitizer:{tmp_path / 'memcheck.log'}"])
    step = row(tmp_path, "memcheck")
    assert step["status"] == status and step["figures"].get("errors") == errors


def test_a_missing_figures_file_fails_a_step_that_passed_and_a_timeout_stays_one(summary, tmp_path):
    init(summary, tmp_path, "bench", "slow")
    summary.main(["record", str(tmp_path), "bench", "--status", "passed", "--seconds", "3",
                  "--figures", f"ops-benchmark:{tmp_path / 'bench.json'}"])
    summary.main(["record", str(tmp_path), "slow", "--status", "timed out", "--seconds", "20",
                  "--figures", f"json:{tmp_path / 'slow.json'}"])
    assert row(tmp_path, "bench")["status"] == "failed" and "bench.json" in row(tmp_path, "bench")["reason"]
    assert row(tmp_path, "slow")["status"] == "timed out"


def test_ops_benchmark_figures_are_the_slowest_kernel_per_op_and_mode(summary, tmp_path):
    rows = [dict(op="slice_attention", preset=p, mode="fwd", impl=i, speedup_vs_eager=s, roofline_pct=r,
                 peak_mem_mib=None) for p, i, s, r in [("a", "kernel", 1.5, 40.0), ("b", "kernel", 0.8, 60.0),
                                                        ("a", "eager", 1.0, 30.0), ("b", "sdpa", 0.5, 70.0)]]
    rows += [dict(op="StructTokenHead train step", preset="h", mode="fwd+loss+bwd", impl=i, speedup_vs_eager=s,
                  roofline_pct=None, peak_mem_mib=m) for i, s, m in [("kernel", 1.2, 90.0), ("eager", 1.0, 100.0)]]
    (tmp_path / "bench.json").write_text(json.dumps({"roofline": {"gbps": 4800.0, "tflops": 989.0}, "rows": rows}))
    figures, problems = summary.ops_benchmark_figures(str(tmp_path / "bench.json"))
    assert not problems
    assert figures["slice_attention fwd: slowest vs eager"] == 0.8 and figures["slice_attention fwd: slowest at"] == "b"
    assert figures["slice_attention fwd: best % roofline"] == 60.0  # the kernel's, not sdpa's
    assert figures["StructTokenHead train step: peak memory kernel / eager"] == pytest.approx(0.9)
    assert figures["peak GB/s"] == 4800.0


def test_selection_finds_node_ids_among_the_collected_tests(summary, tmp_path, capsys):
    (tmp_path / "tests.xml").write_text(JUNIT.format(skipped=3))
    junit = str(tmp_path / "tests.xml")
    assert summary.main(["selection", junit, "tests/test_ops_x.py::test_a[1x2-float32]",
                         "tests/test_ops_y.py::test_c"]) == 0
    assert summary.main(["selection", junit, "tests/test_ops_x.py::test_a[1x2-float16]"]) == 1
    assert "test_a[1x2-float16]" in capsys.readouterr().out


# -------------------------------------------------------------------------------- tools/gpu_check_train.py
def test_training_figures_say_whether_the_loss_is_finite_and_decreasing(tmp_path):
    train = load_tool("gpu_check_train")
    lines = [{"iteration": 19, "total_loss": 1.8, "time": 0.05, "data_time": 0.01},
             {"iteration": 39, "total_loss": 1.2, "time": 0.04, "data_time": 0.01},
             {"iteration": 40, "sem_seg/mIoU": 12.5}]
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    figures, problems = train.metrics_figures(tmp_path / "metrics.json")
    assert not problems
    assert figures == {"loss first": 1.8, "loss last": 1.2, "losses logged": 2, "loss finite": True,
                       "loss decreasing": True, "s/it": 0.04, "data s/it": 0.01, "mIoU": 12.5}
    lines[1]["total_loss"] = float("nan")
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    figures, problems = train.metrics_figures(tmp_path / "metrics.json")
    assert figures["loss finite"] is False and problems
    args = train.build_parser().parse_args(["--output", "o", "--json", "j", "--require-decrease",
                                            "--require-kernels", "--require-backend", "nccl"])
    output = "structtoken_d2.ops on cuda: pytorch\nStarted by torchrun: 1 processes (gloo backend); ...\n"
    problems = train.check_run("torchrun", figures, output, args)
    assert figures["ops"] == "pytorch" and figures["backend"] == "gloo"
    assert len(problems) == 3  # no decrease, not the kernels, not NCCL
