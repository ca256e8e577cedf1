"""structtoken_runtime and tools/evaluate_onnx.py on a model exported by tools/export_model.py: the
single-scale logits and the multi-scale + flip probabilities equal those of the PyTorch evaluation
(StructTokenSegmentor after the test mapper's resize; SemanticSegmentorWithTTA); evaluate_onnx's
metrics equal --eval-only's; the runtime imports and runs with torch and detectron2 unimportable;
its errors are one line."""
import subprocess
import sys

import numpy as np
import pytest
import torch

import structtoken_d2  # noqa: F401  (registrations)
from structtoken_d2.data.transforms import ResizeToScale
from structtoken_d2.engine import Trainer
from structtoken_d2.modeling import StructTokenCheckpointer
from structtoken_d2.modeling.test_time_augmentation import SemanticSegmentorWithTTA
from structtoken_runtime import StructTokenONNX
from tiny_runs import REPO, SHAPES_CONFIG, load_tool, restored_loggers, tiny_cfg, tiny_opts, write_folder_dataset

CLASSES = ["bg", "a", "b"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny random PWE model (slide, TEST.SCALE 32, ratios 0.75 ... 1.5 + flip) on a 3-class folder
    dataset, its weights, and its export by tools/export_model.py."""
    tmp = tmp_path_factory.mktemp("runtime")
    root = write_folder_dataset(tmp / "data", num_classes=3, splits={"train": 2, "val": 3}, size=(45, 70))
    overrides = {"DATASETS.FOLDER.ROOT": str(root), "DATASETS.FOLDER.CLASSES": CLASSES,
                 "DATASETS.TRAIN": ("folder_train",), "DATASETS.TEST": ("folder_val",),
                 "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 3, "OUTPUT_DIR": str(tmp / "out"), "TEST.SLIDE_BATCH": 3}
    cfg = tiny_cfg(overrides)
    torch.manual_seed(0)
    model = Trainer.build_model(cfg).eval()
    StructTokenCheckpointer(model, save_dir=str(tmp)).save("weights")
    path = tmp / "model.onnx"
    opts = [str(v) for v in tiny_opts(overrides)] + ["MODEL.WEIGHTS", str(tmp / "weights.pth")]
    load_tool("export_model").main(["--config-file", str(SHAPES_CONFIG), "--output", str(path)] + opts)
    return cfg, model, str(path)


def _image(h=45, w=70, seed=3):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)  # RGB, as INPUT.FORMAT


@pytest.mark.parametrize("size", [(45, 70), (61, 23), (20, 26)])  # shrunk, shrunk to slide windows, enlarged
def test_single_scale_logits_equal_the_evaluation(exported, size):
    cfg, model, path = exported
    image = _image(*size)
    resized = ResizeToScale(cfg.TEST.SCALE).get_transform(image).apply_image(image)  # the test mapper's
    with torch.no_grad():
        expected = model([{"image": torch.as_tensor(resized.transpose(2, 0, 1).copy()),
                           "height": size[0], "width": size[1]}])[0]["sem_seg"].numpy()
    got = StructTokenONNX(path, threads=1).predict(image, image_format="RGB", tta=False)
    assert got.shape == expected.shape == (3,) + size
    assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-4


def test_multi_scale_flip_probabilities_equal_the_pytorch_tta(exported):
    cfg, model, path = exported
    image = _image()
    expected = SemanticSegmentorWithTTA(cfg, model)(
        [{"image": torch.as_tensor(image.transpose(2, 0, 1).copy()), "height": 45, "width": 70}])[0]["sem_seg"]
    runtime = StructTokenONNX(path, threads=1)
    assert runtime.metadata["aug_ratios"] == [0.75, 1.0, 1.25, 1.5] and runtime.metadata["aug_flip"]
    got = runtime.predict(image[:, :, ::-1], image_format="BGR", tta=True)  # BGR in: turned into the model's RGB
    assert got.shape == (3, 45, 70)
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(got.sum(0), 1, atol=1e-5)


@pytest.mark.parametrize("tta", [False, True])
def test_evaluate_onnx_gives_the_metrics_of_eval_only(exported, tta):
    cfg, model, path = exported
    with restored_loggers():
        expected = (Trainer.test_with_TTA(cfg, model) if tta else Trainer.test(cfg, model))
        got = load_tool("evaluate_onnx").main(["--model", path, "--threads", "1", "--tta" if tta else "--no-tta"])
    key = "folder_val_TTA" if tta else "folder_val"
    assert list(got) == [key]
    expected = expected if tta else {key: expected}  # Trainer.test returns a single dataset's results unnamed
    for metric in ("mIoU", "fwIoU", "mACC", "pACC"):
        assert got[key]["sem_seg"][metric] == pytest.approx(expected[key]["sem_seg"][metric], abs=1e-6), metric


def test_runtime_runs_with_torch_and_detectron2_unimportable(exported):
    _, _, path = exported
    code = f"""
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "detectron2", "structtoken_d2", "torchvision", "timm"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Refuse())
import numpy as np
from structtoken_runtime import StructTokenONNX
model = StructTokenONNX({path!r}, threads=1)
scores = model.predict(np.zeros((30, 50, 3), np.uint8), tta=True)
print(scores.shape, model.class_names, sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "detectron2")))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(3, 30, 50) ['bg', 'a', 'b'] []"


def test_evaluate_onnx_errors_are_one_line(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    plain = tmp_path / "plain.onnx"  # a valid ONNX model that is not an export of this project
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(plain))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    tool = load_tool("evaluate_onnx")
    for model, message in [(tmp_path / "missing.onnx", "missing.onnx: no such file"),
                           (plain, "plain.onnx: not a structtoken-d2 export (metadata config, class_names"),
                           (garbage, "garbage.onnx: onnxruntime cannot load it")]:
        with pytest.raises(SystemExit) as excinfo:
            tool.main(["--model", str(model)])
        text = str(excinfo.value.code)
        assert "\n" not in text and ": error: " in text and message in text, text
