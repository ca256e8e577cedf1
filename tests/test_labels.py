"""Label and image files are checked where they are read: values outside 0..K-1 and 255, 16-bit
or colour label maps, and files that are not images are refused with one line naming the file."""
import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import structtoken_d2  # noqa: F401
from detectron2.data import MetadataCatalog
from structtoken_d2.data import build_dataset_mapper, read_sem_seg_label
from structtoken_d2.evaluation import SemSegEvaluator
from tiny_runs import SHAPES_CONFIG, load_tool, restored_loggers, tiny_cfg, tiny_opts, write_folder_dataset

K = 6  # classes of the synthetic config


def _record(tmp_path, label, image=None, name="x"):
    image = np.full((*np.asarray(label).shape[:2], 3), 100, np.uint8) if image is None else image
    cv2.imwrite(str(tmp_path / f"{name}.jpg"), image)
    label_path = tmp_path / f"{name}_label.png"
    if isinstance(label, bytes):
        label_path.write_bytes(label)
    else:
        Image.fromarray(np.asarray(label)).save(label_path)
    return {"file_name": str(tmp_path / f"{name}.jpg"), "sem_seg_file_name": str(label_path)}


def _train_mapper():
    return build_dataset_mapper(tiny_cfg(), is_train=True)


def test_training_refuses_label_values_outside_the_classes_naming_file_values_and_range(tmp_path):
    label = np.zeros((32, 32), np.uint8)
    label[3:9, 3:9] = 9
    label[20:, 20:] = 7
    label[0] = 255  # ignore is valid
    record = _record(tmp_path, label)
    with pytest.raises(ValueError) as err:  # before: "Target 9 is out of bounds" deep in F.cross_entropy
        _train_mapper()(record)
    message = str(err.value)
    assert record["sem_seg_file_name"] in message
    assert "7, 9" in message and f"0..{K - 1}" in message and "255" in message
    assert "\n" not in message


def test_valid_labels_with_ignore_are_read_unchanged(tmp_path):
    label = np.array([[0, 5, 255], [3, 1, 2]], np.uint8)
    record = _record(tmp_path, label)
    np.testing.assert_array_equal(read_sem_seg_label(record, K), label)


def test_a_label_file_is_opened_once(tmp_path, monkeypatch):
    label = np.array([[0, 5, 255], [3, 1, 2]], np.uint8)
    record = _record(tmp_path, label)
    opened, real_open = [], Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(fp) or real_open(fp, *a, **k))
    np.testing.assert_array_equal(read_sem_seg_label(record, K), label)
    assert len(opened) == 1  # the mode and the pixels from one read (every training sample reads one)


def test_16_bit_labels_are_refused_not_wrapped_modulo_256(tmp_path):
    label = np.full((32, 32), 256 + 3, np.uint16)  # read as 3 (wrapped) before
    record = _record(tmp_path, label)
    with pytest.raises(ValueError) as err:
        _train_mapper()(record)
    assert record["sem_seg_file_name"] in str(err.value) and "I;16" in str(err.value)


def test_colour_labels_are_refused_with_the_file_name(tmp_path):
    record = _record(tmp_path, np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=record["sem_seg_file_name"] + ".*RGB"):
        read_sem_seg_label(record, K)


@pytest.mark.parametrize("broken", ["label", "image"])
def test_a_file_that_is_not_an_image_gets_one_line_naming_it(tmp_path, broken):
    record = _record(tmp_path, np.zeros((8, 8), np.uint8))
    path = record["sem_seg_file_name" if broken == "label" else "file_name"]
    with open(path, "w") as f:
        f.write("this is not an image\n")
    with pytest.raises(ValueError) as err:  # before: PIL's UnidentifiedImageError (an OSError)
        _train_mapper()(record)
    assert str(err.value) == f"{path}: not an image file"


def test_evaluation_range_error_names_the_file(tmp_path):
    name = "test_labels_four_classes"
    MetadataCatalog.get(name).set(stuff_classes=["a", "b", "c", "d"], ignore_label=255)
    record = _record(tmp_path, np.array([[0, 7], [1, 255]], np.uint8))
    evaluator = SemSegEvaluator(name, distributed=False)
    evaluator.reset()
    with pytest.raises(ValueError) as err:
        evaluator.process([record], [{"sem_seg": torch.zeros(4, 2, 2)}])
    assert record["sem_seg_file_name"] in str(err.value) and "7" in str(err.value) and "0..3" in str(err.value)


def test_command_line_reports_a_bad_label_in_one_line(tmp_path, monkeypatch):
    """Through tools/train_net.py (labels read in a DataLoader worker): exit status 1 and one line
    naming the file, instead of a traceback."""
    root = write_folder_dataset(tmp_path / "data", num_classes=3)
    bad = root / "labels" / "val" / "1.png"
    cv2.imwrite(str(bad), np.full((24, 40), 4, np.uint8))
    train_net = load_tool("train_net")
    untrained = train_net.Trainer.build_model(tiny_cfg({"MODEL.SEM_SEG_HEAD.NUM_CLASSES": 3, "DATASETS.TRAIN": (),
                                                        "DATASETS.TEST": ()}))
    train_net.StructTokenCheckpointer(untrained, save_dir=str(tmp_path)).save("untrained")
    opts = tiny_opts({"DATASETS.FOLDER.ROOT": str(root), "DATASETS.FOLDER.CLASSES": ["bg", "a", "b"],
                      "DATASETS.TRAIN": ("folder_train",), "DATASETS.TEST": ("folder_val",),
                      "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 3, "DATALOADER.NUM_WORKERS": 1,
                      "MODEL.WEIGHTS": str(tmp_path / "untrained.pth"), "OUTPUT_DIR": str(tmp_path / "out")})
    args = train_net.default_argument_parser().parse_args(
        ["--config-file", str(SHAPES_CONFIG), "--eval-only"] + [str(o) for o in opts])
    monkeypatch.setattr("sys.argv", ["train_net.py"])
    with restored_loggers(), pytest.raises(SystemExit) as exit_info:
        train_net.main(args)
    message = str(exit_info.value.code)
    assert message.startswith("train_net.py: error: ") and "\n" not in message
    assert f"{bad}: label values 4" in message and "0..2" in message

