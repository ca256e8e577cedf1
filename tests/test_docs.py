"""The docs work as written: every shell command of README.md, CHANGELOG.md and docs/ names tools,
configs, files and Makefile targets that exist, parses with its tool's own argument parser, overrides
only config keys that exist, and every relative link and image resolves (tests/docs_check.py). A
copy of the docs with broken commands and links injected is reported at each broken line, and at no
other."""
import os
import shutil

import pytest

import docs_check
from docs_check import REPO, check_docs

SHAPES = "configs/synthetic/structtoken_shapes.yaml"

#: Prepended to the copy's README.md: (line, what the report must say about it, or None: nothing).
README_LINES = [
    ("```bash", None),
    (f"python tools/no_such_tool.py --config-file {SHAPES}", "tools/no_such_tool.py: no such tool"),
    (f".venv/bin/python tools/train_net.py --config-file {SHAPES} --no-such-option", "unrecognized arguments: "
     "--no-such-option"),
    (f"python tools/train_net.py --config-file {SHAPES} SOLVER.NO_SUCH_KEY 3  # a comment", "SOLVER.NO_SUCH_KEY is "
     "not a config key"),
    (f"python tools/train_net.py --config-file {SHAPES} \\", "SOLVER.MAX_ITER takes an integer"),
    ("    --eval-only SOLVER.MAX_ITER many", None),  # continued: reported at the command's first line
    ("python tools/demo.py --config-file configs/ade20k/no_such.yaml --input a.jpg --output out",
     "configs/ade20k/no_such.yaml: no such file"),
    ("python tools/demo.py --config-file my_config.yaml --input a.jpg --output out",
     "--config-file my_config.yaml: no such config file"),
    (f"python tools/benchmark_model.py --config-file {SHAPES} --mode fast", "invalid choice: 'fast'"),
    ("python tools/visualize_tokens.py --config-file CFG --input photos/ --output out --classes car MODEL.NO_KEY 1",
     "MODEL.NO_KEY is not a config key"),
    ("make setup && make no_such_target", "make no_such_target: no such target"),
    ("PYTHON=.venv/bin/python bash tools/no_such_checks.sh out", "tools/no_such_checks.sh: no such tool"),
    (".venv/bin/python -m pytest tests/test_no_such_file.py -q | tail -n 1",
     "tests/test_no_such_file.py: no such file"),
    ("torchrun --nproc_per_node 2 tools/train_net.py --config-file configs/no_such_dir/x.yaml",
     "configs/no_such_dir/x.yaml: no such file"),
    ('echo "unclosed', "cannot split the command into words"),
    (f"python tools/train_net.py --config-file {SHAPES} MODEL.WEIGHTS ... MODEL.NO_SUCH.KEY ...",
     "MODEL.NO_SUCH.KEY is not a config key"),
    # working commands, placeholders and the reader's own files: nothing to report
    (f"python tools/train_net.py --config-file {SHAPES} SOLVER.MAX_ITER 5 OUTPUT_DIR output/x  # comment", None),
    ("python tools/visualize_tokens.py --config-file CFG --input photos/ --output out --classes car door "
     "MODEL.WEIGHTS model.pth", None),
    ("OMP_NUM_THREADS=1 timeout 60 .venv/bin/python tools/analyze_model.py --config-file configs/ade20k/structtoken_cse"
     ".yaml --no-flops", None),
    ("ls configs/ade20k/*.yaml tests/test_docs.py::test_x > /tmp/list.txt 2>&1; make test", None),
    ("python tools/demo.py --config-file ... --input /path/to/img.jpg my_data/a.png --output out", None),
    (f"python tools/train_net.py --config-file {SHAPES} --eval-only MODEL.WEIGHTS ... SOLVER.MAX_ITER ...", None),
    ("```", None),
    ("```console", None),
    ("$ make no_such_console_target", "make no_such_console_target: no such target"),
    ("tools/no_such_output_line.py is output, not a command", None),
    ("```", None),
    ("```", None),
    ("copypaste: mIoU,fwIoU", None),
    ("python tools/no_such_unmarked.py", "tools/no_such_unmarked.py: no such tool"),
    ("tools/  configs/  a file tree", None),
    ("```", None),
    ("```python", None),
    ('os.system("python tools/no_such_in_python.py")', None),
    ("```", None),
    ("A [missing page](docs/no_such_page.md), an image ![x](docs/no_such_image.png), a link in `[code](no.md)`.",
     "no such file"),
    ("[a heading that is not there](docs/injected/page.md#no-such-heading)", "no heading '#no-such-heading'"),
    ("[fine](docs/injected/page.md#injected-heading-with-code-and-punctuation) [web](https://example.com/x.md)", None),
]

#: docs/injected/page.md of the copy.
PAGE_LINES = [
    ("## Injected heading: with `code`, and punctuation!", None),
    ("## Twice", None),
    ("## Twice", None),
    ("[second](#twice-1) [up](../../README.md) <img src=\"../injected/page.md\"> <a name=\"here\"></a>", None),
    ("[third](#twice-2) [there](#here)", "no heading '#twice-2'"),
    ("[from here](no_such_sibling.md) <img src=\"no_such.svg\">", "no such file"),
]


def copy_docs(destination):
    """README.md and the other top-level Markdown files and docs/ copied under ``destination``; the
    rest of the repository linked, so that links out of the docs resolve as in the repository."""
    destination.mkdir(exist_ok=True)
    for entry in REPO.iterdir():
        if entry.name == "docs":
            shutil.copytree(entry, destination / "docs")
        elif entry.suffix == ".md":
            shutil.copy(entry, destination / entry.name)
        elif entry.name != ".git":
            os.symlink(entry, destination / entry.name)
    return destination


def expected(lines, first_line):
    return {(first_line + i, message) for i, (_, message) in enumerate(lines) if message}


def test_the_docs_commands_paths_and_links_work():
    problems = check_docs()
    assert not problems, "\n".join(map(str, problems))


def test_an_unbroken_copy_of_the_docs_reports_nothing(tmp_path):
    root = copy_docs(tmp_path / "repo")
    assert len(docs_check.markdown_files(root)) == len(docs_check.markdown_files())
    problems = check_docs(root, REPO)
    assert not problems, "\n".join(map(str, problems))


@pytest.fixture
def broken_copy(tmp_path):
    root = copy_docs(tmp_path / "repo")
    readme = root / "README.md"
    readme.write_text("\n".join(line for line, _ in README_LINES) + "\n" + readme.read_text())
    (root / "docs" / "injected").mkdir()
    (root / "docs" / "injected" / "page.md").write_text("\n".join(line for line, _ in PAGE_LINES) + "\n")
    return root


def test_every_injected_break_is_reported_at_its_line_and_nothing_else(broken_copy):
    problems = check_docs(broken_copy, REPO)
    found = {(p.file, p.line) for p in problems}
    wanted = {("README.md", line): message for line, message in expected(README_LINES, 1)}
    wanted.update({(os.path.join("docs", "injected", "page.md"), line): message
                   for line, message in expected(PAGE_LINES, 1)})
    assert found == set(wanted), "\n".join(map(str, problems))
    for problem in problems:
        assert wanted[problem.file, problem.line] in problem.message, str(problem)
    links_line = 1 + next(i for i, (line, _) in enumerate(README_LINES) if line.startswith("A [missing page]"))
    links = sorted(p.message.split(":")[0] for p in problems if (p.file, p.line) == ("README.md", links_line))
    assert links == ["link docs/no_such_image.png", "link docs/no_such_page.md"]


def test_the_command_line_prints_file_line_message_and_fails(broken_copy, monkeypatch, capsys):
    monkeypatch.chdir(broken_copy)
    assert docs_check.main(["README.md"]) == 1
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len([1 for _, m in README_LINES if m]) + 1  # the line with two broken links: twice
    for line, message in expected(README_LINES, 1):
        assert any(p.startswith(f"README.md:{line}: ") and message in p for p in printed), (line, message)
