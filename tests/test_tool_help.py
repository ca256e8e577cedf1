"""Every tool says what it is for and how to run it: the ``--help`` of each tools/*.py (its module-level
``build_parser()``) and of each tools/*.sh opens with a one-line purpose and shows an example
invocation, and the examples it shows pass the docs checker (tests/docs_check.py)."""
import argparse
import re
import subprocess

import pytest

from docs_check import REPO, check_commands, load_tool

PYTHON_TOOLS = sorted(p.name for p in (REPO / "tools").glob("*.py"))
SHELL_TOOLS = sorted(p.name for p in (REPO / "tools").glob("*.sh"))
MAX_PURPOSE = 120  # characters: one line of the code's width


def assert_purpose_line(text: str, tool: str) -> None:
    first = text.splitlines()[0].strip() if text.strip() else ""
    assert first, f"{tool}: the help does not open with its purpose"
    assert first.endswith(".") and len(first) <= MAX_PURPOSE, \
        f"{tool}: the help's first line is not a one-line purpose (a sentence of at most {MAX_PURPOSE} characters " \
        f"ending with '.'): {first!r}"


def example_lines(text: str, launcher: str, name: str):
    return [line for line in text.splitlines() if re.search(rf"(?:^|[\s/]){launcher} tools/{re.escape(name)}(?:\s|$)",
                                                          line)]


@pytest.mark.parametrize("name", PYTHON_TOOLS)
def test_python_tool_help_has_a_purpose_and_working_examples(name):
    module = load_tool(REPO / "tools" / name)
    assert callable(getattr(module, "build_parser", None)), f"tools/{name} has no module-level build_parser()"
    parser = module.build_parser()
    assert isinstance(parser, argparse.ArgumentParser)
    assert_purpose_line(parser.description or "", f"tools/{name}")
    help_text = parser.format_help()
    assert example_lines(help_text, "python", name), f"tools/{name} --help shows no `python tools/{name} ...`"
    problems = check_commands(help_text.splitlines(), 1)
    assert not problems, f"tools/{name} --help: " + "; ".join(f"line {n}: {m}" for n, m in problems)


def shell_header(text: str):
    """The comment lines after the shebang, without their ``#``."""
    lines = text.splitlines()[1:]
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(re.sub(r"^# ?", "", line))
    return header


@pytest.mark.parametrize("name", SHELL_TOOLS)
def test_shell_tool_help_has_a_purpose_and_an_example(name, tmp_path):
    path = REPO / "tools" / name
    header = shell_header(path.read_text())
    assert_purpose_line("\n".join(header), f"tools/{name}")
    assert example_lines("\n".join(header), "bash", name), f"tools/{name}: its header shows no `bash tools/{name} ...`"
    assert not check_commands(header), check_commands(header)
    code = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    assert any("--help" in line for line in code), f"tools/{name} does not answer --help"
    # (run only once the script is known to answer --help: without it, it would do its work)
    shown = subprocess.run(["bash", str(path), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert header[0] in shown.stdout and example_lines(shown.stdout, "bash", name), shown.stdout
    assert list(tmp_path.iterdir()) == [], "--help wrote files"
