"""Dataset registration, the missing-dataset error, label conversions and the synthetic set."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io

import structtoken_d2  # noqa: F401
from detectron2.data import DatasetCatalog, MetadataCatalog
from structtoken_d2.data import read_sem_seg_label
from structtoken_d2.data.datasets import DatasetNotFoundError, require_dataset_files, shapes
from structtoken_d2.data.datasets.coco_stuff_10k import coco_stuff_train_ids

REPO = Path(__file__).resolve().parents[1]
PUBLIC_DATASETS = {
    "ade20k_sem_seg_train": (150, "ADEChallengeData2016"),
    "ade20k_sem_seg_val": (150, "ADEChallengeData2016"),
    "cityscapes_fine_sem_seg_train": (19, "cityscapes"),
    "cityscapes_fine_sem_seg_val": (19, "cityscapes"),
    "coco_stuff_10k_sem_seg_train": (171, "coco_stuff_10k"),
    "coco_stuff_10k_sem_seg_test": (171, "coco_stuff_10k"),
}


@pytest.fixture
def datasets_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("name", sorted(PUBLIC_DATASETS))
def test_registered_with_class_names_and_colors(name):
    num_classes, _ = PUBLIC_DATASETS[name]
    meta = MetadataCatalog.get(name)
    assert len(meta.stuff_classes) == num_classes == len(meta.stuff_colors)
    assert len(set(meta.stuff_classes)) == num_classes
    assert meta.ignore_label == 255 and meta.evaluator_type == "sem_seg"


@pytest.mark.parametrize("check", ["load", "check without loading"])
@pytest.mark.parametrize("name", sorted(PUBLIC_DATASETS))
def test_missing_dataset_error_names_layout_and_preparation(name, check, datasets_dir):
    _, directory = PUBLIC_DATASETS[name]
    with pytest.raises(DatasetNotFoundError) as err:
        DatasetCatalog.get(name) if check == "load" else require_dataset_files(name)
    message = str(err.value)
    assert str(datasets_dir / directory) in message  # which directory is missing
    assert "Expected layout" in message and directory + "/" in message
    assert "To prepare it:" in message


def test_import_does_not_need_the_data(tmp_path):
    code = "import structtoken_d2; from detectron2.data import DatasetCatalog; print('ade20k_sem_seg_val' in DatasetCatalog.list())"
    env = {"DETECTRON2_DATASETS": str(tmp_path / "nothing_here"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"


def test_ade20k_labels_are_read_with_reduce_zero_label(datasets_dir):
    root = datasets_dir / "ADEChallengeData2016"
    for sub in ("images/validation", "annotations/validation"):
        (root / sub).mkdir(parents=True)
    cv2.imwrite(str(root / "images/validation/ADE_val_1.jpg"), np.zeros((2, 3, 3), np.uint8))
    cv2.imwrite(str(root / "annotations/validation/ADE_val_1.png"), np.array([[0, 1, 2], [150, 75, 0]], np.uint8))
    (record,) = DatasetCatalog.get("ade20k_sem_seg_val")
    np.testing.assert_array_equal(read_sem_seg_label(record), [[255, 0, 1], [149, 74, 255]])


def test_coco_stuff_ids_to_train_ids():
    # 0 unlabeled -> 255; person (1) -> 0; stop sign (13) -> 11 since id 12 is unused; 12 -> 255;
    # toothbrush (90) -> 79; banner (92, first stuff) -> 80; wood (182) -> 170.
    ids = np.array([[0, 1, 13, 12], [90, 92, 182, 91]])
    np.testing.assert_array_equal(coco_stuff_train_ids(ids), [[255, 0, 11, 255], [79, 80, 170, 255]])
    with pytest.raises(ValueError, match="0..182"):
        coco_stuff_train_ids(np.array([[183]]))


def test_prepare_coco_stuff_10k_converts_the_release(tmp_path):
    release = tmp_path / "cocostuff-10k-v1.1"
    for sub in ("images", "annotations", "imageLists"):
        (release / sub).mkdir(parents=True)
    for split, name in (("train", "COCO_train2014_000000000077"), ("test", "COCO_train2014_000000000078")):
        (release / "imageLists" / f"{split}.txt").write_text(name + "\n")
        cv2.imwrite(str(release / "images" / f"{name}.jpg"), np.full((2, 2, 3), 90, np.uint8))
        scipy.io.savemat(str(release / "annotations" / f"{name}.mat"), {"S": np.array([[0, 1], [92, 182]], np.uint16)})
    out = tmp_path / "datasets" / "coco_stuff_10k"
    spec = importlib.util.spec_from_file_location("prepare_coco_stuff_10k", REPO / "tools/prepare_coco_stuff_10k.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.convert(release, out)
    label = cv2.imread(str(out / "annotations/test/COCO_train2014_000000000078.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(label, [[255, 0], [80, 170]])
    assert (out / "images/train/COCO_train2014_000000000077.jpg").is_file()


@pytest.fixture
def tiny_shapes(datasets_dir, monkeypatch):
    monkeypatch.setattr(shapes, "SHAPES_SPLITS", {"train": (12, 0), "val": (4, 1)})
    return datasets_dir


def test_shapes_generation_is_deterministic_and_atomic(tiny_shapes, tmp_path, monkeypatch):
    records = DatasetCatalog.get("shapes_sem_seg_train")
    assert len(records) == 12 and len(DatasetCatalog.get("shapes_sem_seg_val")) == 4
    first = [Path(r["sem_seg_file_name"]).read_bytes() for r in records]
    # Only the final directory is left behind (no temporary directory).
    assert [p.name for p in (tiny_shapes / "shapes_sem_seg").iterdir()] == [shapes.shapes_root().name]

    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "again"))
    again = [Path(r["sem_seg_file_name"]).read_bytes() for r in DatasetCatalog.get("shapes_sem_seg_train")]
    assert first == again


def test_shapes_labels_have_background_shapes_and_ignore(tiny_shapes):
    labels = [read_sem_seg_label(r) for r in DatasetCatalog.get("shapes_sem_seg_train")]
    values = set(np.unique(np.stack(labels)).tolist())
    assert values <= {0, 1, 2, 3, 4, 5, 255}
    assert {0, 255} <= values and len(values - {0, 255}) >= 3
    for label in labels:
        assert (label == 0).any() and ((label >= 1) & (label <= 5)).any() and (label == 255).any()


def test_shapes_class_is_not_given_by_colour(tiny_shapes):
    # Pixels of one class take very different colours across images: colour cannot name the class.
    means = {}
    for record in DatasetCatalog.get("shapes_sem_seg_train"):
        image = cv2.imread(record["file_name"]).astype(np.float64)
        label = read_sem_seg_label(record)
        for cls in range(1, 6):
            if (label == cls).sum() > 50:
                means.setdefault(cls, []).append(image[label == cls].mean(0))
    spread = [np.ptp(np.stack(m), axis=0).max() for m in means.values() if len(m) >= 2]
    assert spread and min(spread) > 60
