"""Training: optimizer groups, lr schedule, mixed precision, a 2-iteration run that resumes, and
which evaluations a run makes."""
import pytest
import torch
from torch import nn

import structtoken_d2  # noqa: F401
from detectron2.solver import LRMultiplier
from detectron2.utils.events import EventStorage, get_event_storage
from structtoken_d2.data.datasets import shapes
from structtoken_d2.engine import MixedPrecisionTrainer, Trainer, WarmupPolyParamScheduler
from tiny_runs import SHAPES_CONFIG, Interrupt, load_tool, tiny_cfg


@pytest.fixture
def tiny_shapes(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))
    monkeypatch.setattr(shapes, "SHAPES_SPLITS", {"train": (6, 0), "val": (2, 1)})


def test_two_iterations_write_a_checkpoint_that_resumes_to_iteration_three(tiny_shapes, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_cfg({"SOLVER.MAX_ITER": 3, "SOLVER.CHECKPOINT_PERIOD": 2, "OUTPUT_DIR": str(out)})
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.register_hooks([Interrupt(after_iter=1)])
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


@pytest.mark.parametrize("period, max_iter, eval_after_train, evaluated, evaluated_tta", [
    (1, 2, True, [0, 2], [2]),
    (1, 2, False, [0, 2], []),  # the evaluation due at the last iteration is periodic: it runs
    (2, 3, False, [1], []),  # only the one after training is skipped
])
def test_periodic_evaluations_all_run_and_eval_after_train_adds_the_final_ones(
        tiny_shapes, tmp_path, monkeypatch, period, max_iter, eval_after_train, evaluated, evaluated_tta):
    """The iterations (of the event storage: the number of iterations done when after training) at
    which the plain and the test-time-augmentation evaluations run."""
    done = {"plain": [], "TTA": []}

    def recorder(kind):
        return classmethod(lambda cls, cfg, model, evaluators=None: done[kind].append(get_event_storage().iter) or {})

    monkeypatch.setattr(Trainer, "test", recorder("plain"))
    monkeypatch.setattr(Trainer, "test_with_TTA", recorder("TTA"))
    trainer = Trainer(tiny_cfg({"SOLVER.MAX_ITER": max_iter, "TEST.EVAL_PERIOD": period, "TEST.AUG.ENABLED": True,
                                "TEST.EVAL_AFTER_TRAIN": eval_after_train, "OUTPUT_DIR": str(tmp_path)}))
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert done == {"plain": evaluated, "TTA": evaluated_tta}


def test_param_groups_weight_decay_and_head_lr(tiny_shapes, tmp_path):
    cfg = tiny_cfg({"OUTPUT_DIR": str(tmp_path)})
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
    train_net = load_tool("train_net")
    args = train_net.default_argument_parser().parse_args(
        ["--config-file", str(SHAPES_CONFIG), "OUTPUT_DIR", str(tmp_path)]
    )
    cfg = train_net.setup(args)
    assert cfg.MODEL.DEVICE == "cpu"
    assert (tmp_path / "config.yaml").is_file()
