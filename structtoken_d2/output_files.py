"""Writing output files whole or not at all: into a temporary file beside the target, then renamed
(or hard-linked) into place, so that an interrupted run never leaves half a file behind."""
import os
import tempfile
from typing import Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_temporary(path: str, write: Callable[[str], None]) -> str:
    """Calls ``write(tmp)`` on a fresh temporary file in ``path``'s folder with ``path``'s
    extension (writers such as ``savefig`` / ``cv2.imwrite`` pick the format by it); returns it."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    stem, ext = os.path.splitext(name)
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".partial{ext}", dir=folder)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private (0600); give it an ordinary file's mode
    try:
        write(tmp)
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def replace_file(path: str, write: Callable[[str], None]) -> str:
    """Writes ``path`` atomically through ``write(tmp_path)``, replacing an older ``path`` (for
    results a run regenerates, e.g. ``inference/per_class_*.json``). Returns ``path``."""
    os.replace(_write_temporary(path, write), path)
    return path


def save_new_file(path: str, write: Callable[[str], None]) -> str:
    """Writes through ``write(tmp_path)`` to ``path``, or, when something exists there, to the first
    free ``<stem>_1<ext>``, ``<stem>_2<ext>``, ...: never over an existing file (an input, an
    earlier output), even when another process creates one meanwhile. Returns the path written."""
    tmp = _write_temporary(path, write)
    stem, ext = os.path.splitext(path)
    try:
        for n in range(100000):
            candidate = path if n == 0 else f"{stem}_{n}{ext}"
            try:
                os.link(tmp, candidate)  # atomic, and fails instead of replacing an existing file
                return candidate
            except FileExistsError:
                continue
        raise FileExistsError(f"{path}: no free name among {stem}_1{ext} ... {stem}_99999{ext}")
    finally:
        os.unlink(tmp)
