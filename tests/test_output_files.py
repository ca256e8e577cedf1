"""Output files written whole, never over an existing file unless asked, with an ordinary mode."""
import errno
import os

import pytest

from structtoken_d2.output_files import create_file, replace_file, save_new_file


def _writer(text):
    def write(path):
        with open(path, "w") as f:
            f.write(text)

    return write


def test_save_new_file_never_overwrites_and_numbers_the_name(tmp_path):
    target = tmp_path / "fig.png"
    target.write_text("mine")
    assert save_new_file(str(target), _writer("a")) == str(tmp_path / "fig_1.png")
    assert save_new_file(str(target), _writer("b")) == str(tmp_path / "fig_2.png")
    assert target.read_text() == "mine" and (tmp_path / "fig_2.png").read_text() == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png", "fig_1.png", "fig_2.png"]  # no temp left


def test_replace_file_replaces_and_a_failed_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "table.csv"
    replace_file(str(target), _writer("old"))
    replace_file(str(target), _writer("new"))
    assert target.read_text() == "new"

    def broken(path):
        with open(path, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        replace_file(str(target), broken)
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_files_get_the_mode_of_an_ordinary_new_file(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_new_file(str(tmp_path / "a.txt"), _writer("x"))
        assert os.stat(path).st_mode & 0o777 == 0o644  # not mkstemp's private 0600
    finally:
        os.umask(old)


def test_create_file_refuses_an_existing_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "model.pth"
    assert create_file(str(target), _writer("new")) == str(target) and target.read_text() == "new"
    with pytest.raises(FileExistsError, match="model.pth exists"):
        create_file(str(target), _writer("other"))
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["model.pth"]


def test_data_reach_the_disk_before_the_file_gets_its_name(tmp_path, monkeypatch):
    """fsync of the temporary file, with all its data, before it is renamed into place: else a power
    loss can leave an empty file under the final name."""
    synced = []

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        synced.append((os.path.basename(path), open(path).read(), (tmp_path / "a.txt").exists()))

    monkeypatch.setattr(os, "fsync", fsync)
    replace_file(str(tmp_path / "a.txt"), _writer("all of it"))
    ((name, content, renamed_already),) = synced
    assert name != "a.txt" and content == "all of it" and not renamed_already


def test_without_hard_links_the_name_is_claimed_exclusively(tmp_path, monkeypatch):
    """On file systems without hard links (os.link raises EPERM: FAT, exFAT, some mounts)."""
    def no_link(src, dst):
        raise PermissionError(errno.EPERM, "Operation not permitted", src)

    monkeypatch.setattr(os, "link", no_link)
    target = tmp_path / "fig.png"
    target.write_text("mine")
    assert save_new_file(str(target), _writer("a")) == str(tmp_path / "fig_1.png")
    assert create_file(str(tmp_path / "new.png"), _writer("b")) == str(tmp_path / "new.png")
    with pytest.raises(FileExistsError):
        create_file(str(target), _writer("c"))
    assert target.read_text() == "mine" and (tmp_path / "fig_1.png").read_text() == "a"
    assert (tmp_path / "new.png").read_text() == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png", "fig_1.png", "new.png"]  # no temp left
