"""Training: optimizer groups, lr schedule, mixed precision, and a 2-iteration run that resumes."""
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

import structtoken_d2  # noqa: F401
from detectron2.config import get_cfg
from detectron2.engine import HookBase
from detectron2.utils.events import EventStorage
from detectron2.solver import LRMultiplier
from structtoken_d2 import add_structtoken_config
from structtoken_d2.data.datasets import shapes
from structtoken_d2.engine import MixedPrecisionTrainer, Trainer, WarmupPolyParamScheduler

REPO = Path(__file__).resolve().parents[1]
SHAPES_CONFIG = REPO / "configs/synthetic/structtoken_shapes.yaml"


def tiny_cfg(output_dir, max_iter=2):
    """The synthetic config shrunk to a 1-block, 32-channel model on 32 x 32 crops."""
    cfg = get_cfg()
    add_structtoken_config(cfg)
    cfg.merge_from_file(str(SHAPES_CONFIG))
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu", "MODEL.VIT.EMBED_DIM", 32, "MODEL.VIT.DEPTH", 1, "MODEL.VIT.NUM_HEADS", 2,
        "MODEL.VIT.IMG_SIZE", [32, 32], "MODEL.STRUCTTOKEN.NUM_BLOCKS", 1, "MODEL.STRUCTTOKEN.TOKEN_SIZE", [2, 2],
        "INPUT.CROP.SIZE", [32, 32], "INPUT.RESIZE_SCALE", [32, 32], "SOLVER.IMS_PER_BATCH", 2,
        "SOLVER.MAX_ITER", max_iter, "SOLVER.WARMUP_ITERS", 1, "SOLVER.CHECKPOINT_PERIOD", 1000,
        "DATALOADER.NUM_WORKERS", 0, "TEST.EVAL_PERIOD", 0, "TEST.AUG.ENABLED", False,
        "OUTPUT_DIR", str(output_dir),
    ])
    return cfg


@pytest.fixture
def tiny_shapes(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))
    monkeypatch.setattr(shapes, "SHAPES_SPLITS", {"train": (6, 0), "val": (2, 1)})


class _Interrupt(HookBase):
    """Stops training with an exception after ``after_iter`` (like Ctrl-C), after the checkpointer ran."""

    def __init__(self, after_iter):
        self.after_iter = after_iter

    def after_step(self):
        if self.trainer.iter == self.after_iter:
            raise KeyboardInterrupt


def test_two_iterations_write_a_checkpoint_that_resumes_to_iteration_three(tiny_shapes, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_cfg(out, max_iter=3)
    cfg.SOLVER.CHECKPOINT_PERIOD = 2
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.register_hooks([_Interrupt(after_iter=1)])
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert (out / "last_checkpoint").read_text().strip() == "model_0000001.pth"
    checkpoint = torch.load(out / "model_0000001.pth", map_location="cpu", weights_only=False)
    assert checkpoint["iteration"] == 1  # iterations 0 and 1 done
    tokens_after_two = checkpoint["model"]["sem_seg_head.tokens"].clone()

    resumed = Trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    torch.testing.assert_close(resumed.model.state_dict()["sem_seg_head.tokens"], tokens_after_two)
    resumed.train()
    assert resumed.scheduler.last_epoch == 3
    steps = {int(s["step"]) for s in resumed.optimizer.state_dict()["state"].values()}
    assert steps == {3}  # AdamW state restored from the checkpoint, then one more step
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert final["iteration"] == 2  # the third iteration ran, and only it
    assert not torch.equal(final["model"]["sem_seg_head.tokens"], tokens_after_two)


def test_param_groups_weight_decay_and_head_lr(tiny_shapes, tmp_path):
    cfg = tiny_cfg(tmp_path)
    cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY, cfg.SOLVER.HEAD_LR_MULTIPLIER = 0.1, 0.01, 8.0
    model = Trainer.build_model(cfg)
    optimizer = Trainer.build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.AdamW)
    settings = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            settings[id(p)] = (group["lr"], group["weight_decay"])
    params = dict(model.named_parameters())
    assert len(settings) == len(params)

    def of(name):
        return settings[id(params[name])]

    assert of("backbone.vit.pos_embed") == (0.1, 0.0)
    assert of("backbone.vit.cls_token") == (0.1, 0.0)
    assert of("backbone.vit.blocks.0.norm1.weight") == (0.1, 0.0)
    assert of("backbone.vit.blocks.0.attn.qkv.weight") == (0.1, 0.01)
    assert of("sem_seg_head.tokens") == (pytest.approx(0.8), 0.0)
    head_norms = [n for n, m in model.sem_seg_head.named_modules() if isinstance(m, nn.LayerNorm)]
    assert head_norms and of(f"sem_seg_head.{head_norms[0]}.weight") == (pytest.approx(0.8), 0.0)
    head_weights = [n for n, p in params.items() if n.startswith("sem_seg_head.") and n.endswith("weight") and p.ndim == 4]
    assert of(head_weights[0]) == (pytest.approx(0.8), 0.01)


def test_warmup_poly_schedule_values():
    # max_iter 100, linear warmup over 10 iterations from ratio 1e-6, power 1:
    # it 0: 1 * 1e-6; it 5: 0.95 * (1 - 0.5 * (1 - 1e-6)); it 10: 0.9; it 50: 0.5; it 99: 0.01.
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2.0)
    scheduler = LRMultiplier(optimizer, WarmupPolyParamScheduler(100, 1.0, 10, 1e-6), max_iter=100)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(2e-6)
    assert lrs[5] == pytest.approx(2 * 0.95 * 0.5000005)
    assert lrs[10] == pytest.approx(1.8)
    assert lrs[50] == pytest.approx(1.0)
    assert lrs[99] == pytest.approx(0.02)


def test_mixed_precision_step_runs_under_autocast_bfloat16_on_cpu():
    seen = []

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(4, 4))

        def forward(self, data):
            seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            return {"loss": (torch.ones(2, 4) @ self.w).sum()}

    model = Recorder()
    trainer = MixedPrecisionTrainer(model, [[0]] * 2, torch.optim.SGD(model.parameters(), lr=0.1), "cpu", torch.bfloat16)
    with EventStorage(0) as trainer.storage:
        trainer.run_step()
    assert seen == [(True, torch.bfloat16)]
    assert not torch.equal(model.w.detach(), torch.ones(4, 4))  # the optimizer stepped


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_train_net_falls_back_to_cpu_without_gpu(tmp_path):
    spec = importlib.util.spec_from_file_location("train_net", REPO / "tools/train_net.py")
    train_net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_net)
    args = train_net.default_argument_parser().parse_args(
        ["--config-file", str(SHAPES_CONFIG), "OUTPUT_DIR", str(tmp_path)]
    )
    cfg = train_net.setup(args)
    assert cfg.MODEL.DEVICE == "cpu"
    assert (tmp_path / "config.yaml").is_file()
