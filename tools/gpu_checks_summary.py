#!/usr/bin/env python
"""Keep OUT/summary.json and OUT/summary.md of tools/gpu_checks.sh: one row per step, rewritten after each step.

    python tools/gpu_checks_summary.py init gpu_out --mode gpu --budget 540 --step build 100 240 "build the kernels"
    python tools/gpu_checks_summary.py record gpu_out build --status passed --seconds 84 --figures json:gpu_out/b.json
    python tools/gpu_checks_summary.py selection gpu_out/cuda_tests.xml "tests/test_ops_slice_attention.py::test_x[a]"
    python tools/gpu_checks_summary.py field gpu_out/device.json torch_cuda_arch_list
    python tools/gpu_checks_summary.py finish gpu_out

``init`` lists every step as "not run"; ``record`` fills in a step's row (status, seconds, key figures,
reason) and rewrites both files whole (a temporary file renamed into place), so that a run cut off
midway still leaves a summary that says how far it got. The key figures come from the files each
step leaves (``--figures KIND:FILE``): ``json`` (a flat object the step wrote), ``junit`` (pytest's
``--junitxml``), ``sanitizer`` (a compute-sanitizer log), ``ops-benchmark`` and ``model-benchmark``
(the ``--json`` of tools/benchmark_ops.py and tools/benchmark_model.py). A step whose figures
contradict its exit status fails: tests skipped where they had to run, sanitizer errors, a missing
figures file. ``finish`` prints summary.md and exits 1 when a step failed, timed out or was not run.

Standard library only: it starts in milliseconds, whatever the interpreter holds.
"""
import argparse
import json
import math
import os
import re
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from datetime import datetime, timezone
from typing import Callable, Dict, List, Optional, Tuple

STATUSES = ("passed", "failed", "timed out", "skipped", "not run")
MODES = {"gpu": "GPU run", "dry-run": "Dry run on the CPU: tiny shapes and a few iterations, to show that every "
                                       "step's command, arguments and parsing work (no GPU figures)"}
FAILED = ("failed", "timed out", "not run")  # what makes `finish` exit 1


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------- key figures
def json_figures(path: str) -> Tuple[Dict, List[str]]:
    """A flat JSON object a step wrote (its own key figures); its ``problems`` list, if any, fails the step."""
    with open(path) as f:
        data = json.load(f)
    problems = [str(p) for p in data.pop("problems", [])]
    return {k: v for k, v in data.items() if v is not None}, problems


def junit_figures(path: str) -> Tuple[Dict, List[str]]:
    """Counts of pytest's ``--junitxml`` report: tests, passed, failed, errors, skipped."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    figures = {"tests": counts["tests"], "passed": counts["tests"] - counts["failures"] - counts["errors"]
               - counts["skipped"], "failed": counts["failures"], "errors": counts["errors"],
               "skipped": counts["skipped"]}
    return figures, []


def junit_test_ids(path: str) -> List[str]:
    """The pytest node ids (``tests/test_x.py::test_y[z]``) of the test cases of a ``--junitxml`` report."""
    ids = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        module = case.get("classname", "").replace(".", "/")
        ids.append(f"{module}.py::{case.get('name')}")
    return ids


SANITIZER_ERRORS = re.compile(r"ERROR SUMMARY: (\d+) errors?")
RACECHECK_SUMMARY = re.compile(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)")


def sanitizer_figures(path: str) -> Tuple[Dict, List[str]]:
    """compute-sanitizer's summary lines: ``ERROR SUMMARY: N errors`` (memcheck, synccheck; racecheck
    too in recent versions) and racecheck's ``RACECHECK SUMMARY: ... (N errors, M warnings)``."""
    with open(path, errors="replace") as f:
        text = f.read()
    figures, problems = {}, []
    errors = [int(n) for n in SANITIZER_ERRORS.findall(text)]
    for _, race_errors, warnings in RACECHECK_SUMMARY.findall(text):
        errors.append(int(race_errors))
        figures["warnings"] = figures.get("warnings", 0) + int(warnings)
    if not errors:
        return figures, [f"no compute-sanitizer summary line in {os.path.basename(path)}"]
    figures["errors"] = max(errors)
    if figures["errors"]:
        problems.append(f"compute-sanitizer reported {figures['errors']} error(s)")
    return figures, problems


def ops_benchmark_figures(path: str) -> Tuple[Dict, List[str]]:
    """tools/benchmark_ops.py --json: per op and mode, the kernel's slowest speed-up over eager PyTorch
    across the presets (and where) and its best % of the roofline; the head step's memory ratio."""
    with open(path) as f:
        data = json.load(f)
    rows = data["rows"]
    roofline = data.get("roofline", {})
    figures = {"peak GB/s": roofline.get("gbps"), "peak TFLOP/s": roofline.get("tflops")}
    kernel = [r for r in rows if r["impl"] == "kernel" and r.get("speedup_vs_eager")]
    for op, mode in sorted({(r["op"], r["mode"]) for r in kernel}):
        group = [r for r in kernel if (r["op"], r["mode"]) == (op, mode)]
        slowest = min(group, key=lambda r: r["speedup_vs_eager"])
        figures[f"{op} {mode}: slowest vs eager"] = slowest["speedup_vs_eager"]
        figures[f"{op} {mode}: slowest at"] = slowest["preset"]
        roofline = [r["roofline_pct"] for r in group if r.get("roofline_pct") is not None]
        if roofline:
            figures[f"{op} {mode}: best % roofline"] = max(roofline)
    memory = {r["impl"]: r.get("peak_mem_mib") for r in rows if r["op"] == "StructTokenHead train step"}
    if memory.get("kernel") and memory.get("eager"):
        figures["StructTokenHead train step: peak memory kernel / eager"] = memory["kernel"] / memory["eager"]
    return {k: v for k, v in figures.items() if v is not None}, [] if rows else ["no rows"]


def model_benchmark_figures(path: str) -> Tuple[Dict, List[str]]:
    """tools/benchmark_model.py --json: per scenario and variant, images/s and the speed-up over the
    scenario's first variant."""
    with open(path) as f:
        rows = json.load(f)["rows"]
    figures = {}
    for r in rows:
        figures[f"{r['scenario']}, {r['variant']}"] = f"{r['images_per_s']:.4g} img/s, {r['speedup']:.2f}x"
    return figures, [] if rows else ["no rows"]


FIGURES: Dict[str, Callable[[str], Tuple[Dict, List[str]]]] = {
    "json": json_figures, "junit": junit_figures, "sanitizer": sanitizer_figures,
    "ops-benchmark": ops_benchmark_figures, "model-benchmark": model_benchmark_figures,
}


def figures_spec(text: str) -> Tuple[str, str]:
    kind, sep, path = text.partition(":")
    if not sep or kind not in FIGURES:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KIND:FILE with KIND one of {', '.join(FIGURES)}")
    return kind, path


def test_expectation_problems(figures: Dict, expect: str) -> List[str]:
    """``expect`` "run": tests collected, none skipped or failed; "skipped" (a dry run of GPU tests):
    tests collected, every one skipped."""
    if "tests" not in figures:
        return []
    if figures["tests"] == 0:
        return ["the test selection collected no test"]
    if expect == "run" and figures["skipped"]:
        return [f"{figures['skipped']} of {figures['tests']} tests skipped (a skipped test is not a pass)"]
    if expect == "skipped" and figures["skipped"] != figures["tests"]:
        return [f"{figures['tests'] - figures['skipped']} of {figures['tests']} GPU tests ran on the CPU"]
    return []


# ----------------------------------------------------------------------------------------- summary
def summary_paths(out: str) -> Tuple[str, str]:
    return os.path.join(out, "summary.json"), os.path.join(out, "summary.md")


def load_summary(out: str) -> Dict:
    with open(summary_paths(out)[0]) as f:
        return json.load(f)


def write_whole(path: str, text: str) -> None:
    """``text`` into ``path`` through a temporary file renamed into place (never half a file)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def device_line(device: Optional[Dict]) -> str:
    if not device:
        return "Device: not recorded yet."
    parts = [device.get("device", "?")]
    if device.get("compute_capability"):
        parts.append(f"compute capability {device['compute_capability']}")
    if device.get("memory_gib"):
        parts.append(f"{device['memory_gib']:.0f} GiB")
    roofline = [f"{device[k]:g} {unit}" for k, unit in (("peak_gbps", "GB/s"), ("peak_tflops_bf16", "TFLOP/s bf16"))
                if device.get(k)]
    line = f"Device: {', '.join(parts)}; torch {device.get('torch', '?')}, CUDA {device.get('cuda') or 'none'}"
    return line + (f"; roofline {', '.join(roofline)} ({device.get('peak_source', '?')})" if roofline else "")


def format_value(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def cell(text: str) -> str:
    """``text`` as one Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(summary: Dict) -> str:
    steps = summary["steps"]
    done = [s["seconds"] for s in steps if s["seconds"] is not None]
    lines = [f"# GPU checks of structtoken-d2 ({summary['mode']})", "", MODES[summary["mode"]] + ".", "",
             device_line(summary.get("device")), "",
             f"Started {summary['started']}, updated {summary['updated']}; {sum(done):.0f} s of steps so far, "
             f"{sum(s['planned_s'] for s in steps)} s planned, budget {summary['budget_s']} s; commit "
             f"{summary.get('commit') or 'unknown'}.", "",
             "| step | status | seconds (planned) | key figures | notes |", "|---|---|---|---|---|"]
    for s in steps:
        seconds = "-" if s["seconds"] is None else f"{s['seconds']:.0f}"
        figures = "<br>".join(f"{k}: {format_value(v)}" for k, v in s["figures"].items())
        notes = "; ".join(x for x in (s.get("reason"), s.get("log") and f"log `{s['log']}`") if x)
        lines.append(f"| {cell(s['name'] + ': ' + s['title'])} | {s['status']} | {seconds} ({s['planned_s']}) | "
                     f"{cell(figures)} | {cell(notes)} |")
    counts = {status: sum(s["status"] == status for s in steps) for status in STATUSES}
    lines += ["", ", ".join(f"{n} {status}" for status, n in counts.items() if n) + "."]
    return "\n".join(lines) + "\n"


def save(out: str, summary: Dict) -> None:
    summary["updated"] = _now()
    device_json = os.path.join(out, "device.json")
    if os.path.exists(device_json):
        try:
            with open(device_json) as f:
                summary["device"] = json.load(f)
        except (OSError, ValueError):
            pass
    json_path, md_path = summary_paths(out)
    write_whole(json_path, json.dumps(summary, indent=1) + "\n")
    write_whole(md_path, markdown(summary))


# ---------------------------------------------------------------------------------------- commands
def init(args) -> int:
    os.makedirs(args.out, exist_ok=True)
    steps = [{"name": name, "title": title, "planned_s": int(planned), "timeout_s": int(timeout), "status": "not run",
              "seconds": None, "figures": {}, "reason": None, "log": None}
             for name, planned, timeout, title in args.step]
    save(args.out, {"mode": args.mode, "budget_s": args.budget, "commit": args.commit, "started": _now(),
                    "device": None, "steps": steps})
    return 0


def record(args) -> int:
    summary = load_summary(args.out)
    step = next((s for s in summary["steps"] if s["name"] == args.step), None)
    if step is None:
        sys.exit(f"gpu_checks_summary: no step {args.step!r} in {summary_paths(args.out)[0]}; its steps: "
                 f"{', '.join(s['name'] for s in summary['steps'])}")
    status, problems, figures = args.status, [], {}
    for kind, path in args.figures:
        if not os.path.exists(path):
            if status in ("passed", "skipped"):
                problems.append(f"no {os.path.basename(path)}")
            continue
        try:
            found, found_problems = FIGURES[kind](path)
        except (OSError, ValueError, KeyError, TypeError, ElementTree.ParseError) as e:
            found, found_problems = {}, [f"cannot read {os.path.basename(path)} ({type(e).__name__}: {e})"]
        figures.update(found)
        problems += found_problems
        if kind == "junit" and args.expect_tests:
            problems += test_expectation_problems(found, args.expect_tests)
    for item in args.figure:
        key, _, value = item.partition("=")
        figures[key] = value
    reasons = [args.reason] if args.reason else []
    if problems and status in ("passed", "skipped"):
        status = "failed"
        reasons = problems + reasons
    elif problems:
        reasons += problems
    step.update(status=status, seconds=args.seconds, figures=figures, reason="; ".join(reasons) or None, log=args.log)
    save(args.out, summary)
    shown = "; ".join(f"{k}: {format_value(v)}" for k, v in figures.items())
    shown = shown if len(shown) <= 200 else shown[:200] + " ... (summary.md has all)"
    print(f"   {status} ({args.seconds:.0f} s, {step['planned_s']} planned){': ' + shown if shown else ''}"
          f"{'  [' + step['reason'] + ']' if step['reason'] else ''}", flush=True)
    return 0


def selection(args) -> int:
    """Checks that pytest node ids are among the test cases of a ``--junitxml`` report (a dry run's check
    of a selection that only a GPU machine runs)."""
    known = set(junit_test_ids(args.junit))
    missing = [node for node in args.node_ids if node not in known]
    if missing:
        print(f"gpu_checks_summary: not among the {len(known)} tests of {args.junit}: {', '.join(missing)}")
        return 1
    print(f"gpu_checks_summary: all {len(args.node_ids)} node ids are among the {len(known)} tests of {args.junit}")
    return 0


def field(args) -> int:
    with open(args.file) as f:
        value = json.load(f).get(args.key)
    if value is None:
        return 1
    print(value)
    return 0


def finish(args) -> int:
    summary = load_summary(args.out)
    print(markdown(summary), end="")
    return 1 if any(s["status"] in FAILED for s in summary["steps"]) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("init", help="write a summary with every step 'not run'")
    p.add_argument("out", help="the output folder of tools/gpu_checks.sh")
    p.add_argument("--mode", choices=sorted(MODES), required=True)
    p.add_argument("--budget", type=int, required=True, help="seconds the whole run may take")
    p.add_argument("--commit", default=None, help="the commit checked, if known")
    p.add_argument("--step", nargs=4, action="append", required=True,
                   metavar=("NAME", "PLANNED_S", "TIMEOUT_S", "TITLE"))
    p.set_defaults(run=init)
    p = commands.add_parser("record", help="fill in one step's row and rewrite summary.json and summary.md")
    p.add_argument("out")
    p.add_argument("step")
    p.add_argument("--status", choices=STATUSES, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--reason", default=None, help="why it was skipped or failed")
    p.add_argument("--log", default=None, help="the step's log, relative to OUT")
    p.add_argument("--figures", type=figures_spec, action="append", default=[], metavar="KIND:FILE",
                   help=f"key figures from FILE, KIND one of {', '.join(FIGURES)} (repeatable)")
    p.add_argument("--figure", action="append", default=[], metavar="KEY=VALUE", help="one more key figure")
    p.add_argument("--expect-tests", choices=("run", "skipped"), default=None,
                   help="with junit figures: every test must have run, or (dry run of GPU tests) been skipped")
    p.set_defaults(run=record)
    p = commands.add_parser("selection", help="check that pytest node ids are among a --junitxml report's tests")
    p.add_argument("junit")
    p.add_argument("node_ids", nargs="+")
    p.set_defaults(run=selection)
    p = commands.add_parser("field", help="print one value of a JSON object (exit 1 when absent)")
    p.add_argument("file")
    p.add_argument("key")
    p.set_defaults(run=field)
    p = commands.add_parser("finish", help="print summary.md; exit 1 when a step failed, timed out or was not run")
    p.add_argument("out")
    p.set_defaults(run=finish)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
