"""Output files written whole, never over an existing file unless asked, with an ordinary mode."""
import os

import pytest

from structtoken_d2.output_files import replace_file, save_new_file


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
