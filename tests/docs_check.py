"""Checks that the commands, paths and links of the Markdown docs work, as a reader would copy them.

    .venv/bin/python tests/docs_check.py             # README.md, CHANGELOG.md, ... and docs/**/*.md
    .venv/bin/python tests/docs_check.py docs/benchmarks.md

Prints one ``FILE:LINE: message`` per problem; exit status 1 when there is one. The rules:

- Markdown files: the repository's top-level ``*.md`` and ``docs/**/*.md``.
- Commands: the lines of fenced blocks marked ``bash``, ``sh``, ``shell``, ``zsh`` or ``console`` (in
  ``console`` blocks only the lines after a ``$`` prompt; the rest is output), and the lines of
  unmarked blocks (and of a tool's ``--help``: :func:`check_commands`) whose first word, after ``$``
  and ``NAME=value`` words, launches something (then all its commands are checked): ``python*``, ``bash``, ``sh``, ``make``, ``torchrun``
  (any folder) or a ``tools/`` file. Other blocks (python, yaml, output, file trees) are not commands.
  Comments are dropped, backslash-continued lines joined (a problem is reported at the command's first
  line), the line split into words as the shell does (:mod:`shlex`) and into commands at ``;``,
  ``&&``, ``||``, ``|``, ``&``, ``(`` and ``)``; redirections and their targets are dropped.
- A command runs a tool when one of its words is ``tools/NAME.py`` or ``tools/NAME.sh`` (after
  ``python``, ``bash``, ``torchrun ...``, ``timeout 300``, ...): the tool must exist, and a Python
  tool's module-level ``build_parser()`` (imported from the file, not run) must accept the words
  after it (a ``--help`` command is not parsed; shell tools are only checked to exist). Words that
  argparse gave to an ``nargs="+"`` option but that start with a config key move to the overrides, as
  the tools do (:func:`structtoken_d2.config_loading.move_swallowed_overrides`); one left there that
  is shaped like a key (``MODEL.NO_KEY``) is reported. The trailing ``KEY VALUE`` overrides (``opts``)
  must be keys of the ``--config-file`` with values of the right type
  (:func:`structtoken_d2.config_loading.load_config`, as the tool reads them), or of the defaults when
  the config file is a placeholder (a value not ending in ``.yaml``/``.yml``, e.g. ``...`` or ``CFG``);
  of a ``KEY ...`` pair (a placeholder value) only the key is checked.
- ``make TARGET``: the Makefile has the target.
- Paths: a word (or the value of ``--opt=value`` / ``NAME=value``) whose first component is a
  top-level folder of the repository that ``.gitignore`` does not ignore (``configs/``, ``docs/``,
  ``tools/``, ``tests/``, ...) must exist (a glob must match); ``--config-file`` values ending in
  ``.yaml``/``.yml`` too. Everything else is the reader's (``output/...``, ``/path/to/...``,
  ``my_data``, ``img.jpg``, ``.venv/...``), and so are words holding ``$``, ``...``, ``<`` or ``{``.
- Links and images ``[text](target)``, ``![alt](target)``, ``[name]: target`` and HTML
  ``src=``/``href=`` outside code: a relative target must exist (relative to the Markdown file), and an
  ``#anchor`` into a Markdown file (or the file itself) must be the GitHub slug of one of its headings
  (``-1``, ``-2`` for repeated ones) or an HTML ``name``/``id`` in it.
"""
import argparse
import contextlib
import fnmatch
import functools
import importlib.util
import io
import os
import re
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
SHELL_LANGUAGES = {"bash", "sh", "shell", "zsh", "console"}
SEPARATORS = {";", "&&", "||", "|", "&", "|&", "(", ")", ";;"}
LAUNCHER = re.compile(r"(?:.*/)?(?:python[\d.]*|bash|sh|make|torchrun)$|(?:\./)?tools/[^/]+$")
TOOL = re.compile(r"(?:\./)?tools/([^/\s]+\.(?:py|sh))$")
ASSIGNMENT = re.compile(r"[A-Za-z_]\w*=")
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'(][^)]*)?\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
HTML_LINK = re.compile(r"<(?:img|a|source)\b[^>]*?\b(?:src|href)=[\"']([^\"']+)[\"']", re.IGNORECASE)
CONFIG_KEY = re.compile(r"[A-Z][A-Z0-9_]*(?:\.[A-Z][A-Z0-9_]*)+")  # the shape of a key: MODEL.WEIGHTS
PLACEHOLDER_VALUE = re.compile(r"\.\.\.")
CODE_SPAN = re.compile(r"(`+).+?\1")


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class _ParserError(Exception):
    pass


_MISSING = object()


def markdown_files(root: Path = REPO) -> List[Path]:
    """The top-level ``*.md`` of ``root`` and every ``docs/**/*.md``."""
    return sorted(root.glob("*.md")) + sorted((root / "docs").glob("**/*.md"))


def check_docs(root: Path = REPO, repo: Path = REPO, files: Optional[Sequence[Path]] = None) -> List[Problem]:
    """Every problem of the Markdown ``files`` (default :func:`markdown_files` of ``root``), commands
    checked against the tools, configs and Makefile of ``repo``; files named relative to ``root``."""
    problems = []
    for path in files if files is not None else markdown_files(root):
        name = os.path.relpath(path, root)
        text = Path(path).read_text(encoding="utf-8")
        problems += [Problem(name, line, message) for line, message in check_markdown(text, Path(path), repo)]
    return problems


def check_markdown(text: str, path: Path, repo: Path = REPO) -> List[Tuple[int, str]]:
    """``(line, message)`` for every problem of the Markdown ``text`` of the file ``path``."""
    problems, prose = [], []
    for kind, language, start, lines in _blocks(text):
        if kind == "prose":
            prose += [(start + i, line) for i, line in enumerate(lines)]
        elif language in SHELL_LANGUAGES or language == "":
            problems += check_commands(lines, start, repo, every_line=language != "",
                                       prompt_only=language == "console")
    for number, line in prose:
        line = CODE_SPAN.sub("", line)
        targets = LINK.findall(line) + REFERENCE.findall(line) + HTML_LINK.findall(line)
        problems += [(number, message) for target in targets for message in _link_problems(target, path)]
    return sorted(problems)


def check_commands(lines: Sequence[str], first_line: int = 1, repo: Path = REPO, every_line: bool = False,
                   prompt_only: bool = False) -> List[Tuple[int, str]]:
    """``(line, message)`` for the commands among ``lines`` (numbered from ``first_line``): every line
    with ``every_line``, else only lines that launch something (see the module's rules)."""
    problems = []
    for number, command in _logical_lines(lines, first_line, prompt_only):
        try:
            lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
            lexer.commenters, lexer.whitespace_split = "", True
            words = list(lexer)
        except ValueError as e:
            if every_line:
                problems.append((number, f"cannot split the command into words ({e}): {command}"))
            continue
        segments = list(_segments(words))
        if every_line or _launches(segments[0]):  # (prose such as "(tools/x.py) does ..." is no command)
            problems += [(number, message) for segment in segments for message in _command_problems(segment, repo)]
    return problems


# ------------------------------------------------------------------------------------------ markdown
def _blocks(text: str) -> Iterator[Tuple[str, str, int, List[str]]]:
    """``(kind, language, first line number, lines)``: ``prose`` runs and ``code`` blocks (inside the fences)."""
    kind, language, start, lines, fence = "prose", "", 1, [], None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if fence is None and match:
            yield kind, language, start, lines
            kind, language, start, lines, fence = "code", match.group(2).lower(), number + 1, [], match.group(1)
        elif fence is not None and line.strip().startswith(fence[0] * len(fence)) and \
                set(line.strip()) == {fence[0]}:
            yield kind, language, start, lines
            kind, language, start, lines, fence = "prose", "", number + 1, [], None
        else:
            lines.append(line)
    yield kind, language, start, lines


def github_slug(heading: str) -> str:
    """GitHub's anchor of a heading: links and code marks removed, lower case, punctuation other than
    ``-`` and ``_`` removed, spaces as ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[`*]|<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set:
    """The anchors of the Markdown file ``path``: its headings' slugs and its HTML ``name``/``id`` attributes."""
    anchors, counts, previous, headings = set(), {}, "", []
    for kind, _, _, lines in _blocks(path.read_text(encoding="utf-8")):
        for line in lines if kind == "prose" else ():
            anchors.update(re.findall(r"<[^>]*\b(?:name|id)=[\"']([^\"']+)[\"']", line))
            atx = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
            if atx:
                headings.append(atx.group(1))
            elif re.match(r"^ {0,3}(=+|-+)\s*$", line) and previous.strip() and not previous.lstrip().startswith(
                    ("-", "*", "#", ">", "|")):
                headings.append(previous.strip())
            previous = line
    for heading in headings:
        slug = github_slug(heading)
        anchors.add(slug if slug not in counts else f"{slug}-{counts[slug]}")
        counts[slug] = counts.get(slug, 0) + 1
    return anchors


def _link_problems(target: str, path: Path) -> List[str]:
    if re.match(r"[a-zA-Z][\w+.-]*:", target) or target.startswith("//"):
        return []  # https:, mailto:, ...: not the repository's
    file_part, _, anchor = target.partition("#")
    resolved = (path.parent / file_part).resolve() if file_part else path
    if not resolved.exists():
        return [f"link {target}: no such file {os.path.relpath(resolved, path.parent)}"]
    if anchor and resolved.suffix.lower() == ".md" and not {anchor, anchor.lower()} & _anchors(resolved):
        return [f"link {target}: no heading '#{anchor}' in {resolved.name}"]
    return []


# ------------------------------------------------------------------------------------------ commands
def _logical_lines(lines: Sequence[str], first_line: int, prompt_only: bool) -> Iterator[Tuple[int, str]]:
    """``(first line number, command)``: comments dropped, ``$`` prompts removed, continuations joined."""
    pending, start = None, 0
    for number, raw in enumerate(lines, first_line):
        line = _strip_comment(raw).rstrip()
        if pending is None:
            stripped = line.lstrip()
            if prompt_only and not stripped.startswith("$ "):
                continue
            line, start = stripped[2:] if stripped.startswith("$ ") else stripped, number
            pending = ""
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        command, pending = (pending + line).strip(), None
        if command:
            yield start, command
    if pending:
        yield start, pending.strip()


def _strip_comment(line: str) -> str:
    """``line`` without its shell comment (a ``#`` outside quotes, at the start of a word)."""
    quote, escaped = None, False
    for i, char in enumerate(line):
        if escaped:
            escaped = False
        elif char == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1] in " \t;&|("):
            return line[:i]
    return line


def _segments(words: Sequence[str]) -> Iterator[List[str]]:
    """The simple commands of ``words``: split at separators, redirections and their targets dropped."""
    segment, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word in SEPARATORS:
            yield segment
            segment = []
        elif set(word) <= set("<>&|") and set(word) & set("<>"):
            skip = True
            if segment and segment[-1].isdigit():
                segment.pop()
        else:
            segment.append(word)
    yield segment


def _launches(segment: Sequence[str]) -> bool:
    words = [w for w in segment if not ASSIGNMENT.match(w)]
    return bool(words) and bool(LAUNCHER.fullmatch(words[0]))


def _command_problems(segment: Sequence[str], repo: Path) -> List[str]:
    tool_at = next((i for i, w in enumerate(segment) if TOOL.fullmatch(w)), None)
    problems = [message for i, word in enumerate(segment) if i != tool_at for message in _path_problems(word, repo)]
    program = [w for w in segment if not ASSIGNMENT.match(w)]
    if program and os.path.basename(program[0]) == "make":
        return problems + _make_problems(program[1:], repo)
    if tool_at is None:
        return problems
    name = TOOL.fullmatch(segment[tool_at]).group(1)
    path = repo / "tools" / name
    if not path.is_file():
        return problems + [f"tools/{name}: no such tool (tools/ has {', '.join(_tool_names(repo))})"]
    if name.endswith(".py"):
        problems += _tool_argument_problems(path, list(segment[tool_at + 1:]), repo)
    return problems


def _tool_names(repo: Path) -> List[str]:
    return sorted(p.name for p in (repo / "tools").iterdir() if p.suffix in (".py", ".sh"))


@functools.lru_cache(maxsize=None)
def _top_folders(repo: Path) -> frozenset:
    """The top-level folders of ``repo`` that its ``.gitignore`` does not ignore (and not ``.git``)."""
    gitignore = repo / ".gitignore"
    patterns = [p.strip().strip("/") for p in gitignore.read_text().splitlines()
                if p.strip() and not p.startswith(("#", "!"))] if gitignore.is_file() else []
    return frozenset(p.name for p in repo.iterdir() if p.is_dir() and p.name != ".git"
                     and not any(fnmatch.fnmatch(p.name, pattern) for pattern in patterns))


def _path_problems(word: str, repo: Path) -> List[str]:
    value = word.split("=", 1)[1] if re.match(r"(?:--[\w-]+|[A-Za-z_]\w*)=", word) else word
    value = value[2:] if value.startswith("./") else value
    value = value.split("::")[0]  # pytest's file::test
    if "/" not in value or value.split("/")[0] not in _top_folders(repo) or re.search(r"[$<{\s]|\.\.\.", value):
        return []
    if re.search(r"[*?\[]", value):
        return [] if list(repo.glob(value)) else [f"{value}: matches no file"]
    return [] if (repo / value).exists() else [f"{value}: no such file or folder"]


def _make_problems(words: Sequence[str], repo: Path) -> List[str]:
    makefile = repo / "Makefile"
    if not makefile.is_file():
        return ["make: no Makefile"]
    targets = set()
    for line in makefile.read_text().splitlines():
        match = re.match(r"^([^\s:#=][^:#=]*?)\s*::?(?!=)", line)
        targets.update(match.group(1).split() if match else ())
    problems, skip = [], False
    for word in words:
        if skip or word.startswith("-") or "=" in word:
            skip = word in ("-C", "-f", "-j", "-l", "-o", "-W", "-I")
            continue
        if word not in targets:
            problems.append(f"make {word}: no such target in the Makefile (targets: "
                            f"{', '.join(sorted(t for t in targets if not t.startswith('.')))})")
    return problems


@functools.lru_cache(maxsize=None)
def load_tool(path: Path):
    """The module of the tool ``path``, imported (not run: its ``__main__`` block is not executed)."""
    spec = importlib.util.spec_from_file_location(f"docs_check_tool_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_tool_arguments(path: Path, words: Sequence[str]) -> argparse.Namespace:
    """``words`` parsed by the ``build_parser()`` of the tool ``path``; raises ValueError with argparse's
    message when they are not valid (nothing printed, no exit)."""
    parser = load_tool(path).build_parser()

    def fail(message: Optional[str] = None, *_):
        raise _ParserError(message or "")

    parser.error, parser.exit = fail, lambda status=0, message=None: fail(message)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return parser.parse_args(list(words))
    except _ParserError as e:
        raise ValueError(str(e).strip()) from None


def _tool_argument_problems(path: Path, words: List[str], repo: Path) -> List[str]:
    tool = f"tools/{path.name}"
    if not callable(getattr(load_tool(path), "build_parser", None)):
        return [f"{tool} has no module-level build_parser(): its arguments cannot be checked"]
    if any(w in ("-h", "--help") for w in words):
        return []
    try:
        args = parse_tool_arguments(path, words)
    except ValueError as e:
        return [f"{tool} {' '.join(words)}: {e}"]
    if not hasattr(args, "opts"):
        return []
    from structtoken_d2.config_loading import ConfigError, move_swallowed_overrides

    args.opts = list(args.opts or [])
    swallowed = [k for k, v in vars(args).items() if k != "opts" and isinstance(v, list) and v
                 and all(isinstance(x, str) for x in v)]
    try:
        move_swallowed_overrides(args, *swallowed)
    except ConfigError as e:
        return [f"{tool}: {e}"]
    problems = [f"{tool} --{name.replace('_', '-')} ... {word}: {word} is not a config key" for name in swallowed
                for word in getattr(args, name) if CONFIG_KEY.fullmatch(word)]
    configs = getattr(args, "config_file", None)
    configs = [configs] if isinstance(configs, str) else list(configs or [])
    for config in configs or [""]:
        if config and not re.search(r"\.ya?ml$", config):
            config = ""  # a placeholder (..., CFG): the overrides are checked against the defaults
        if config and not (repo / config).is_file():
            problems += [] if _path_problems(config, repo) else [f"--config-file {config}: no such config file"]
            continue  # (a path of the repository's folders: reported as such)
        message = _override_problem(str(repo / config) if config else "", tuple(args.opts))
        if message:
            problems.append(f"{tool}: {message.replace(str(repo) + os.sep, '')}")
    return problems


@functools.lru_cache(maxsize=None)
def _override_problem(config_file: str, opts: Tuple[str, ...]) -> Optional[str]:
    """load_config's message for ``config_file`` (default: an empty config) with ``opts``, or None. A
    pair whose value is the placeholder ``...`` has only its key checked."""
    from structtoken_d2.config_loading import ConfigError, load_config

    pairs = list(zip(opts[0::2], opts[1::2])) if len(opts) % 2 == 0 else []
    placeholders = [key for key, value in pairs if PLACEHOLDER_VALUE.fullmatch(value)]
    given = [word for key, value in pairs if key not in placeholders for word in (key, value)] if pairs else opts
    with tempfile.TemporaryDirectory() as tmp:
        if not config_file:
            config_file = os.path.join(tmp, "defaults.yaml")
            Path(config_file).write_text("VERSION: 2\n")
        try:
            cfg = load_config(config_file, list(given))
            for key in placeholders:
                node = cfg
                for part in key.split("."):
                    node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
                if node is _MISSING:
                    load_config(config_file, [key, "0"])  # raises: not a config key (the value is not used)
        except ConfigError as e:
            return str(e)
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="Markdown files (default: the repository's)")
    args = parser.parse_args(argv)
    problems = check_docs(Path.cwd(), REPO, [f.resolve() for f in args.files]) if args.files else check_docs()
    for problem in problems:
        print(problem)
    print(f"docs_check: {len(problems)} problem(s)", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
