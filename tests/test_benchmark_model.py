"""tools/benchmark_model.py and its helpers: interleaved timing, peak RSS, variants, a tiny run's
rows and JSON, and a JSON file never overwritten without --overwrite."""
import json
import time

import pytest
import torch

import structtoken_d2  # noqa: F401
from structtoken_d2.engine.model_benchmark import Variant, variants
from structtoken_d2.ops import timing
from structtoken_d2.ops.timing import interleaved_times, peak_rss_bytes
from tiny_runs import SHAPES_CONFIG, load_tool, tiny_opts


def test_calls_are_interleaved_round_robin_after_the_warmup_each_round_starting_one_later():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    rounds = []
    times = interleaved_times(fns, torch.device("cpu"), iters=2, warmup=1,
                              on_round=lambda timed, i, t: rounds.append((timed, i)))
    assert calls == ["a", "b", "c"] * 2 + ["b", "c", "a"]  # 1 warm-up round + 2 timed rounds
    assert rounds == [(False, 0), (True, 0), (True, 1)]
    assert all(len(t.wall) == 2 and len(t.cpu) == 2 and t.warmup_s > 0 for t in times.values())


@pytest.mark.parametrize("kernel_peak", [True, False])
def test_peak_rss_sees_a_transient_allocation(kernel_peak, tmp_path, monkeypatch):
    if not kernel_peak:  # the reset refused: the sampling thread
        monkeypatch.setattr(timing, "CLEAR_REFS", str(tmp_path / "missing" / "clear_refs"))
    size = 256 * 2 ** 20

    def allocate():
        buffer = torch.ones(size // 4)  # touched, so resident
        del buffer

    before = peak_rss_bytes(lambda: None)
    assert peak_rss_bytes(allocate) >= before + 0.9 * size


def test_peak_rss_sees_a_peak_between_two_samples():
    # 200 MB allocated and freed after the sampler's first sample and long before its second (10 s):
    # sampling misses it, the kernel's high-water mark (VmHWM, reset before the call) does not.
    size = 200 * 2 ** 20

    def allocate():
        time.sleep(0.05)
        buffer = torch.ones(size // 4)
        del buffer

    before = peak_rss_bytes(lambda: None)
    assert peak_rss_bytes(allocate, interval_s=10.0) >= before + 0.9 * size


def test_variants_are_every_ops_choice_for_every_combination_in_order():
    out = variants(["kernels", "pytorch"], [["MODEL.COMPILE", "False", "True"], ["TEST.SLIDE_BATCH", "1"]])
    assert out == [
        Variant("kernels", (("MODEL.COMPILE", "False"), ("TEST.SLIDE_BATCH", "1"))),
        Variant("pytorch", (("MODEL.COMPILE", "False"), ("TEST.SLIDE_BATCH", "1"))),
        Variant("kernels", (("MODEL.COMPILE", "True"), ("TEST.SLIDE_BATCH", "1"))),
        Variant("pytorch", (("MODEL.COMPILE", "True"), ("TEST.SLIDE_BATCH", "1"))),
    ]
    assert out[2].name == "kernels, COMPILE=True, SLIDE_BATCH=1"
    with pytest.raises(ValueError, match="ops implementation 'cuda'"):
        variants(["cuda"], [])


@pytest.fixture(scope="module")
def benchmark_model():
    return load_tool("benchmark_model")


def test_tiny_run_times_every_scenario_and_variant(benchmark_model, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--config-file", str(SHAPES_CONFIG), "--iters", "2", "--warmup", "1", "--vary", "TEST.SLIDE_BATCH", "1 4",
            "--image-sizes", "40x52", "--json", str(out)] + [str(v) for v in tiny_opts()]
    assert benchmark_model.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["device"].startswith("CPU") and result["date"] and "--vary" in result["command"]
    scenarios = ["train (batch 2)", "infer slide single-scale (40x52)", "infer slide multi-scale+flip (40x52)"]
    names = ["kernels, SLIDE_BATCH=1", "pytorch, SLIDE_BATCH=1", "kernels, SLIDE_BATCH=4", "pytorch, SLIDE_BATCH=4"]
    assert [(r["scenario"], r["variant"]) for r in result["rows"]] == [(s, n) for s in scenarios for n in names]
    for row in result["rows"]:
        assert row["p25_s"] <= row["median_s"] <= row["p75_s"] and row["cpu_median_s"] > 0
        assert row["images_per_s"] == pytest.approx(row["images_per_call"] / row["median_s"])
        assert row["peak_mem_mib"] > 0 and row["iters"] == 2
    assert [r["speedup"] for r in result["rows"][::4]] == [1.0, 1.0, 1.0]  # each scenario's first variant
    assert [r["images_per_call"] for r in result["rows"][::4]] == [2, 1, 1]
    table = capsys.readouterr().out
    assert "| infer slide multi-scale+flip (40x52) | pytorch, SLIDE_BATCH=4 |" in table


def test_an_existing_json_is_not_overwritten_without_the_flag(benchmark_model, tmp_path, capsys):
    out = tmp_path / "bench.json"
    out.write_text("earlier results")
    argv = ["--config-file", str(SHAPES_CONFIG), "--mode", "infer", "--inference", "single-scale", "--ops", "pytorch",
            "--iters", "1", "--warmup", "0", "--image-sizes", "32x32", "--json", str(out)]
    with pytest.raises(SystemExit):
        benchmark_model.main(argv + [str(v) for v in tiny_opts()])
    assert f"--json {out} exists" in capsys.readouterr().err
    assert out.read_text() == "earlier results"
    assert benchmark_model.main(argv + ["--overwrite"] + [str(v) for v in tiny_opts()]) == 0
    assert [r["variant"] for r in json.loads(out.read_text())["rows"]] == ["pytorch"]
