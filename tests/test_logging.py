"""Messages of the structtoken_d2.* loggers reach the console and OUTPUT_DIR/log.txt of a
tools/train_net.py run, with the ops implementation named once at the start."""
import pytest
import torch

import structtoken_d2  # noqa: F401  (before detectron2's submodules)
from detectron2.modeling import build_model
from structtoken_d2 import ops
from structtoken_d2.data.datasets import shapes
from tiny_runs import SHAPES_CONFIG, load_tool, restored_loggers, tiny_cfg, tiny_opts


@pytest.mark.parametrize("eval_only", [False, True])
def test_structtoken_messages_reach_log_txt_and_console(tmp_path, monkeypatch, capsys, eval_only):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))
    monkeypatch.setattr(shapes, "SHAPES_SPLITS", {"train": (4, 0), "val": (2, 1)})
    out = tmp_path / "run"
    train_net = load_tool("train_net")
    overrides = {"SOLVER.MAX_ITER": 1, "OUTPUT_DIR": str(out)}
    if eval_only:  # a model to evaluate, saved before the run (what that logs is not the run's)
        torch.save({"model": build_model(tiny_cfg({"DATASETS.TRAIN": ()})).state_dict()}, tmp_path / "model.pth")
        overrides["MODEL.WEIGHTS"] = str(tmp_path / "model.pth")
        capsys.readouterr()
    opts = tiny_opts(overrides)
    args = train_net.default_argument_parser().parse_args(
        ["--config-file", str(SHAPES_CONFIG)] + (["--eval-only"] if eval_only else []) + [str(o) for o in opts])
    with restored_loggers():
        train_net.main(args)
    log = (out / "log.txt").read_text()
    console = capsys.readouterr().out
    ops_line = f"structtoken_d2.ops on cpu: {ops.active_implementation('cpu')}"
    for text in (log, console):
        assert "the vit_tiny_patch16_384 backbone is randomly initialised" in text  # modeling.backbone.vit
        assert "Generating the synthetic shapes dataset" in text  # data.datasets.shapes
        assert text.count(ops_line) == 1
