"""Install detectron2 into the running Python, for `make setup`.

    .venv/bin/python tools/install_detectron2.py      # what tools/setup_env.sh runs

Order of preference:
1. a detectron2 that already imports is kept;
2. upstream (`pip install git+https://github.com/facebookresearch/detectron2`) when GitHub is
   reachable: a full build, compiled ops included;
3. the source distribution ``pb1-detectron2==0.6`` from the package index, checked against its
   sha256. It holds upstream v0.6's Python files but not its C++ sources, so it is installed
   Python-only, as a regular ``detectron2 0.6`` distribution that pip can list and uninstall.
   ``structtoken_d2.compat`` makes that build work on current NumPy/Pillow.
"""
import argparse
import hashlib
import re
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

SDIST = "pb1-detectron2-0.6.tar.gz"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
INDEX_PAGE = "https://pypi.org/simple/pb1-detectron2/"
UPSTREAM = "git+https://github.com/facebookresearch/detectron2.git"
PYPROJECT = """[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"
[project]
name = "detectron2"
version = "0.6"
description = "detectron2 v0.6 Python sources (pb1-detectron2 sdist), installed without compiled ops"
[tool.setuptools.packages.find]
include = ["detectron2*"]
[tool.setuptools.package-data]
"*" = ["*.yaml"]
"""


def pip(*args: str) -> None:
    subprocess.check_call([sys.executable, "-m", "pip", *args])


def importable() -> bool:
    return subprocess.call([sys.executable, "-c", "import detectron2"], stderr=subprocess.DEVNULL) == 0


def github_reachable() -> bool:
    try:
        urllib.request.urlopen("https://github.com", timeout=5)
        return True
    except OSError:
        return False


def install_python_only(workdir: Path) -> None:
    page = urllib.request.urlopen(INDEX_PAGE, timeout=60).read().decode()
    match = re.search(r'href="([^"#]*/' + re.escape(SDIST) + r')[#"]', page)
    if match is None:
        sys.exit(f"install_detectron2: {SDIST} not found on {INDEX_PAGE}")
    archive = workdir / SDIST
    print(f"install_detectron2: downloading {match.group(1)}")
    archive.write_bytes(urllib.request.urlopen(match.group(1), timeout=300).read())
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        sys.exit(f"install_detectron2: sha256 mismatch for {SDIST}: got {digest}, expected {SDIST_SHA256}")
    project = workdir / "detectron2-pyonly"
    project.mkdir()
    prefix = "pb1-detectron2-0.6/detectron2/"
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        for m in members:
            m.name = m.name[len("pb1-detectron2-0.6/"):]
        tar.extractall(project, members=members, filter="data")
    (project / "pyproject.toml").write_text(PYPROJECT)
    pip("install", "--no-deps", "--no-build-isolation", str(project))


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)


def main() -> None:
    build_parser().parse_args()
    if importable():
        print("install_detectron2: detectron2 already importable, kept")
        return
    if github_reachable():
        try:
            pip("install", "--no-build-isolation", UPSTREAM)
            return
        except subprocess.CalledProcessError:
            print("install_detectron2: upstream build failed, falling back to the Python-only sdist")
    with tempfile.TemporaryDirectory() as tmp:
        install_python_only(Path(tmp))


if __name__ == "__main__":
    main()
