"""tools/demo.py never writes over an input or an existing file, and says where each panel went."""
import cv2
import numpy as np
import pytest

from structtoken_d2.engine import Trainer
from structtoken_d2.modeling import StructTokenCheckpointer
from tiny_runs import SHAPES_CONFIG, load_tool, restored_loggers, tiny_cfg, tiny_opts


@pytest.fixture
def weights(tmp_path):
    model = Trainer.build_model(tiny_cfg({"DATASETS.TRAIN": ()}))
    StructTokenCheckpointer(model, save_dir=str(tmp_path)).save("tiny")
    return tmp_path / "tiny.pth"


def test_demo_output_into_the_input_folder_overwrites_nothing(tmp_path, weights, monkeypatch, capsys):
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    rng = np.random.default_rng(0)
    inputs = [folder / "a.png", folder / "more" / "a.png"]  # two inputs with the same name
    for path in inputs:
        cv2.imwrite(str(path), rng.integers(0, 256, (20, 28, 3), dtype=np.uint8))
    (folder / "a_pred.png").write_bytes(b"an earlier output")
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    argv = ["demo.py", "--config-file", str(SHAPES_CONFIG), "--input", *map(str, inputs), "--output", str(folder)]
    monkeypatch.setattr("sys.argv", argv + [str(o) for o in tiny_opts({"MODEL.WEIGHTS": str(weights)})])
    with restored_loggers():
        load_tool("demo").main()

    assert {p: p.read_bytes() for p in before} == before  # inputs and the earlier output untouched
    new = sorted(set(p for p in folder.rglob("*") if p.is_file()) - set(before))
    assert len(new) == 2 and not any(p.name.startswith(".") for p in new)  # one panel each, no temporary left
    for path in new:
        panel = cv2.imread(str(path))
        assert panel.shape[0] >= 20 and panel.shape[1] == 2 * 28  # image | prediction
    out = capsys.readouterr().out
    for source, target in zip(map(str, inputs), map(str, new)):
        assert f"{source} -> {target}" in out.splitlines(), out
