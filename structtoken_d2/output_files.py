"""Writing output files whole or not at all: into a temporary file beside the target, flushed to
disk, then renamed (or hard-linked) into place, so that an interrupted run or a power loss never
leaves half a file behind."""
import errno
import os
import tempfile
from typing import Callable

#: ``os.link`` errors of file systems without hard links (FAT, exFAT, some network and FUSE mounts).
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_temporary(path: str, write: Callable[[str], None]) -> str:
    """Calls ``write(tmp)`` on a fresh temporary file in ``path``'s folder with ``path``'s
    extension (writers such as ``savefig`` / ``cv2.imwrite`` pick the format by it), then flushes
    it to disk (``fsync``); returns it."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    stem, ext = os.path.splitext(name)
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".partial{ext}", dir=folder)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private (0600); give it an ordinary file's mode
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)  # the writer closed its own handle: its data may still be in the cache
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def _move_to_free_name(tmp: str, path: str) -> None:
    """Moves ``tmp`` to ``path`` unless something exists there (``FileExistsError``, ``tmp`` left
    in place): a hard link, which fails instead of replacing a file; on a file system without hard
    links, the name is claimed by creating it exclusively (``O_EXCL``), then replaced by ``tmp``."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS:
            raise
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL))  # FileExistsError when taken
        try:
            os.replace(tmp, path)
        except BaseException:
            os.unlink(path)  # the empty file that claimed the name
            raise


def _discard(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except FileNotFoundError:  # moved into place
        pass


def replace_file(path: str, write: Callable[[str], None]) -> str:
    """Writes ``path`` atomically through ``write(tmp_path)``, replacing an older ``path`` (for
    results a run regenerates, e.g. ``inference/per_class_*.json``). Returns ``path``."""
    os.replace(_write_temporary(path, write), path)
    return path


def create_file(path: str, write: Callable[[str], None]) -> str:
    """Writes ``path`` atomically through ``write(tmp_path)``, or raises ``FileExistsError`` naming
    it when something exists there, before writing or created by another process meanwhile: never
    over an existing file. Returns ``path``."""
    if os.path.lexists(path):
        raise FileExistsError(f"{path} exists; it is not replaced")
    tmp = _write_temporary(path, write)
    try:
        _move_to_free_name(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path} was created meanwhile; it is not replaced") from None
    finally:
        _discard(tmp)
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
                _move_to_free_name(tmp, candidate)
                return candidate
            except FileExistsError:
                continue
        raise FileExistsError(f"{path}: no free name among {stem}_1{ext} ... {stem}_99999{ext}")
    finally:
        _discard(tmp)
