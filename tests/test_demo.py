"""tools/demo.py never writes over an input or an existing file, says where each panel went, and
decodes each image once."""
import cv2
import numpy as np
import pytest

import structtoken_d2  # noqa: F401
from detectron2.data import detection_utils
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
    reads = []  # each image is decoded once
    read_image = detection_utils.read_image
    monkeypatch.setattr(detection_utils, "read_image", lambda path, **kw: reads.append(path) or read_image(path, **kw))
    with restored_loggers():
        load_tool("demo").main()
    assert sorted(reads) == sorted(map(str, inputs))

    assert {p: p.read_bytes() for p in before} == before  # inputs and the earlier output untouched
    new = sorted(set(p for p in folder.rglob("*") if p.is_file()) - set(before))
    assert len(new) == 2 and not any(p.name.startswith(".") for p in new)  # one panel each, no temporary left
    for path in new:
        panel = cv2.imread(str(path))
        assert panel.shape[0] >= 20 and panel.shape[1] == 2 * 28  # image | prediction
    out = capsys.readouterr().out
    for source, target in zip(map(str, inputs), map(str, new)):
        assert f"{source} -> {target}" in out.splitlines(), out


def test_demo_without_the_weights_file_exits_with_one_line(tmp_path, monkeypatch):
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
    missing = tmp_path / "no_model.pth"
    argv = ["demo.py", "--config-file", str(SHAPES_CONFIG), "--input", str(image), "--output", str(tmp_path / "out")]
    monkeypatch.setattr("sys.argv", argv + [str(o) for o in tiny_opts({"MODEL.WEIGHTS": str(missing)})])
    with restored_loggers(), pytest.raises(SystemExit) as exit_info:
        load_tool("demo").main()
    assert exit_info.value.code == f"demo.py: error: MODEL.WEIGHTS '{missing}' is not a file: pass MODEL.WEIGHTS " \
                                   f"path/to/model_final.pth (a trained model)"
    assert not (tmp_path / "out").exists()
