"""StructTokenCheckpointer: atomic saves, --resume falling back past a broken checkpoint,
fine-tuning a checkpoint to another class count, and refusing a checkpoint of another model."""
import logging
import os

import pytest
import torch

import structtoken_d2  # noqa: F401
from detectron2.modeling import build_model
from detectron2.utils import comm
from structtoken_d2.data.datasets import shapes
from structtoken_d2.engine import Trainer
from structtoken_d2.modeling import CheckpointMismatchError, ClassCountMismatchError, StructTokenCheckpointer
from structtoken_d2.modeling.checkpoint import NoLoadableCheckpointError, WeightsNotFoundError
from tiny_runs import SHAPES_CONFIG, captured_logs, load_tool, restored_loggers, tiny_cfg, tiny_opts


@pytest.fixture
def tiny_shapes(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))
    monkeypatch.setattr(shapes, "SHAPES_SPLITS", {"train": (4, 0), "val": (2, 1)})


def _model(num_classes=6, variant="CSE", seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = tiny_cfg({"MODEL.SEM_SEG_HEAD.NUM_CLASSES": num_classes, "MODEL.STRUCTTOKEN.VARIANT": variant,
                    "DATASETS.TRAIN": (), "DATASETS.TEST": (), **overrides})
    return build_model(cfg)


def test_a_save_interrupted_mid_write_leaves_the_previous_checkpoint_and_tag_intact(tmp_path, monkeypatch):
    model = _model()
    checkpointer = StructTokenCheckpointer(model, save_dir=str(tmp_path))
    checkpointer.save("model_final")
    before = (tmp_path / "model_final.pth").read_bytes()

    real_save = torch.save

    def save_half_then_die(obj, f, *args, **kwargs):  # as if killed after writing half of the file
        real_save(obj, f, *args, **kwargs)
        if isinstance(f, (str, os.PathLike)):
            os.truncate(f, os.path.getsize(f) // 2)
        else:
            f.flush()
            f.truncate(f.tell() // 2)
        raise KeyboardInterrupt

    with torch.no_grad():
        model.sem_seg_head.tokens.add_(1.0)
    monkeypatch.setattr(torch, "save", save_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_final")
    assert (tmp_path / "model_final.pth").read_bytes() == before
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_final.pth"]  # no leftover


def _train_with_a_checkpoint_per_iteration(out, max_iter=3):
    cfg = tiny_cfg({"SOLVER.MAX_ITER": max_iter, "SOLVER.CHECKPOINT_PERIOD": 1, "OUTPUT_DIR": str(out)})
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    # model_0000000 .. model_0000002 (after iterations 0, 1, 2), then model_final (iteration 2 too):
    # make the modification times strictly increasing in that order.
    for age, name in enumerate(["model_final.pth", "model_0000002.pth", "model_0000001.pth", "model_0000000.pth"]):
        os.utime(out / name, (1e9 - age * 100, 1e9 - age * 100))
    return cfg


def test_resume_falls_back_to_the_newest_checkpoint_that_loads(tiny_shapes, tmp_path):
    out = tmp_path / "run"
    cfg = _train_with_a_checkpoint_per_iteration(out)
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    expected = torch.load(out / "model_0000001.pth", weights_only=False)["model"]["sem_seg_head.tokens"]
    for name in ("model_final.pth", "model_0000002.pth"):  # truncated, as by a full disk
        path = out / name
        os.truncate(path, path.stat().st_size // 2)

    resumed = Trainer(cfg)
    with captured_logs() as records:
        resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2  # model_0000001.pth finished iteration 1
    torch.testing.assert_close(resumed.model.state_dict()["sem_seg_head.tokens"], expected)
    assert any("model_final.pth" in r.getMessage() and "model_0000002.pth" in r.getMessage()
               and "resuming from model_0000001.pth" in r.getMessage()
               for r in records if r.levelno == logging.WARNING), "the fallback must say which file it resumes from"

    (out / "model_0000001.pth").unlink()  # last_checkpoint names a missing file
    (out / "last_checkpoint").write_text("model_0000001.pth")
    again = Trainer(cfg)
    again.resume_or_load(resume=True)
    assert again.start_iter == 1  # model_0000000.pth, the only one left that loads


def test_resume_fails_with_a_clear_error_when_no_checkpoint_loads(tiny_shapes, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model_0000009.pth").write_bytes(b"\x80\x02 not a whole checkpoint")
    (out / "last_checkpoint").write_text("model_final.pth")
    trainer = Trainer(tiny_cfg({"OUTPUT_DIR": str(out)}))
    with pytest.raises(FileNotFoundError) as err:
        trainer.resume_or_load(resume=True)
    message = str(err.value)
    assert str(out) in message and "model_final.pth" in message and "model_0000009.pth" in message
    assert "last_checkpoint" in message  # what to do


@pytest.mark.parametrize("variant", ["CSE", "SSE", "PWE"])
def test_fine_tuning_to_another_class_count_reinitialises_only_class_dependent_tensors(variant, tmp_path):
    source = _model(num_classes=6, variant=variant, seed=0)
    StructTokenCheckpointer(source, save_dir=str(tmp_path)).save("six")
    target = _model(num_classes=4, variant=variant, seed=1)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    saved = source.state_dict()
    # Independent of the checkpointer: the tensors whose shapes depend on K are those whose shapes
    # differ between the 6-class and the 4-class model.
    class_dependent = sorted(k for k in fresh if fresh[k].shape != saved[k].shape)
    assert "sem_seg_head.tokens" in class_dependent and any("residual_block" in k for k in class_dependent)
    assert all(k.startswith("sem_seg_head.") for k in class_dependent)

    with pytest.raises(ClassCountMismatchError):  # the default stays the error
        StructTokenCheckpointer(target).load(str(tmp_path / "six.pth"))
    with captured_logs() as records, captured_logs("fvcore") as fvcore_records:
        StructTokenCheckpointer(target, reinit_class_dependent=True).load(str(tmp_path / "six.pth"))
    loaded = target.state_dict()
    for key in loaded:
        expected = fresh[key] if key in class_dependent else saved[key]
        torch.testing.assert_close(loaded[key], expected, rtol=0, atol=0, msg=key)
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "6 to 4 classes" in warnings[0]
    assert all(k in warnings[0] for k in class_dependent)
    assert [r.getMessage() for r in fvcore_records if r.levelno >= logging.WARNING] == []  # not once per tensor


def test_every_process_resumes_from_the_checkpoint_the_main_process_chose(tmp_path, monkeypatch):
    """The main process alone writes checkpoints, so it chooses the one to resume from; the others
    load that one, even where their own look at the folder would choose another."""
    first, second = _model(seed=0), _model(seed=1)
    StructTokenCheckpointer(first, save_dir=str(tmp_path)).save("model_a")
    StructTokenCheckpointer(second, save_dir=str(tmp_path)).save("model_b")  # the one last_checkpoint names
    sent = []

    def all_gather_from_main(main_choice):
        return lambda obj: sent.append(obj) or [main_choice, obj]

    monkeypatch.setattr(comm, "is_main_process", lambda: False)
    monkeypatch.setattr(comm, "all_gather", all_gather_from_main((str(tmp_path / "model_a.pth"), None)))
    target = _model(seed=2)
    StructTokenCheckpointer(target, save_dir=str(tmp_path)).resume_or_load("", resume=True)
    assert sent == [None]
    torch.testing.assert_close(target.sem_seg_head.tokens, first.sem_seg_head.tokens, rtol=0, atol=0)

    monkeypatch.setattr(comm, "all_gather", all_gather_from_main((None, "--resume: no checkpoint in X can be loaded")))
    with pytest.raises(NoLoadableCheckpointError, match="no checkpoint in X"):  # the main process's error
        StructTokenCheckpointer(target, save_dir=str(tmp_path)).resume_or_load("", resume=True)

    monkeypatch.setattr(comm, "is_main_process", lambda: True)  # the main process sends its choice
    monkeypatch.setattr(comm, "all_gather", lambda obj: sent.append(obj) or [obj, None])
    StructTokenCheckpointer(target, save_dir=str(tmp_path)).resume_or_load("", resume=True)
    assert sent[-1] == (str(tmp_path / "model_b.pth"), None)
    torch.testing.assert_close(target.sem_seg_head.tokens, second.sem_seg_head.tokens, rtol=0, atol=0)


@pytest.mark.parametrize("other, expected", [
    ({"MODEL.STRUCTTOKEN.NUM_BLOCKS": 1}, r"\d+ tensor\(s\) the model does not have \(sem_seg_head\.layers\.1\."),
    # (a CSE block that is not the last has a feature FFN, ffn2)
    ({"MODEL.STRUCTTOKEN.NUM_BLOCKS": 3}, r"\d+ model tensor\(s\) missing from it \(sem_seg_head\.layers\.1\.ffn2"),
    ({"MODEL.STRUCTTOKEN.VARIANT": "PWE"}, r"missing from it .*; \d+ tensor\(s\) the model does not have"),
    ({"MODEL.VIT.EMBED_DIM": 48}, r"tensor\(s\) of another shape \(backbone\.[^:]+: \[\d+(, \d+)*\] in the "
                                  r"checkpoint, \[\d+(, \d+)*\] in the model"),
])
def test_a_checkpoint_of_another_model_is_refused_with_what_differs(tmp_path, other, expected):
    source = _model(variant="CSE", **{"MODEL.STRUCTTOKEN.NUM_BLOCKS": 2})
    StructTokenCheckpointer(source, save_dir=str(tmp_path)).save("trained")
    path = str(tmp_path / "trained.pth")
    target = _model(**{"MODEL.STRUCTTOKEN.NUM_BLOCKS": 2, **other})
    with pytest.raises(CheckpointMismatchError, match=expected) as error:
        StructTokenCheckpointer(target).load(path)
    message = str(error.value)
    assert message.startswith(f"{path} does not fit the model of this config: ")
    assert "Use the config it was trained with" in message

    same = _model(variant="CSE", seed=1, **{"MODEL.STRUCTTOKEN.NUM_BLOCKS": 2})  # the same model loads
    StructTokenCheckpointer(same).load(path)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(same.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_a_missing_checkpoint_file_is_named(tmp_path):
    with pytest.raises(WeightsNotFoundError, match=f"^{tmp_path / 'nope.pth'}: no such checkpoint file$"):
        StructTokenCheckpointer(_model()).load(str(tmp_path / "nope.pth"))


def test_eval_only_needs_trained_weights_or_a_checkpoint_to_resume(tiny_shapes, tmp_path, monkeypatch):
    """Not a random model evaluated: without MODEL.WEIGHTS (or --resume with a checkpoint in
    OUTPUT_DIR) --eval-only stops with one line before writing anything."""
    train_net = load_tool("train_net")
    monkeypatch.setattr("sys.argv", ["train_net.py"])
    out = tmp_path / "out"

    def eval_only(*extra):
        args = train_net.default_argument_parser().parse_args(
            ["--config-file", str(SHAPES_CONFIG), "--eval-only", *extra]
            + [str(o) for o in tiny_opts({"OUTPUT_DIR": str(out), "TEST.AUG.ENABLED": False})])
        with restored_loggers():
            return train_net.main(args)

    for extra in ((), ("--resume",)):
        with pytest.raises(SystemExit) as exit_info:
            eval_only(*extra)
        assert str(exit_info.value.code) == (
            "train_net.py: error: MODEL.WEIGHTS '' is not a file: pass MODEL.WEIGHTS path/to/model_final.pth (a "
            "trained model) to evaluate, or --resume to evaluate the last checkpoint of OUTPUT_DIR")
        assert not out.exists()
    out.mkdir()
    StructTokenCheckpointer(_model(variant="PWE"), save_dir=str(out)).save("model_final")
    results = eval_only("--resume")
    assert set(results["sem_seg"]) >= {"mIoU", "fwIoU", "mACC", "pACC"}


@pytest.mark.parametrize("key, hint", [
    ("MODEL.WEIGHTS", "MODEL.WEIGHTS '{path}' is not a file: pass MODEL.WEIGHTS path/to/model_final.pth (a trained "
                      "model) to start from, or '' to train from MODEL.VIT.WEIGHTS"),
    ("MODEL.VIT.WEIGHTS", "MODEL.VIT.WEIGHTS: no such file: '{path}' (weights are never downloaded; give a local timm "
                          "or mmseg .pth/.safetensors or augreg .npz, or '' for random init)"),
])
def test_training_from_a_missing_weight_file_stops_before_writing(tmp_path, monkeypatch, key, hint):
    train_net = load_tool("train_net")
    monkeypatch.setattr("sys.argv", ["train_net.py"])
    out, path = tmp_path / "out", tmp_path / "nope.pth"
    args = train_net.default_argument_parser().parse_args(
        ["--config-file", str(SHAPES_CONFIG)] + [str(o) for o in tiny_opts({"OUTPUT_DIR": str(out), key: str(path)})])
    with restored_loggers(), pytest.raises(SystemExit) as exit_info:
        train_net.main(args)
    assert str(exit_info.value.code) == "train_net.py: error: " + hint.format(path=path)
    assert not out.exists()
