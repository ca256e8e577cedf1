"""bfloat16 autocast on the CPU (``SOLVER.AMP.ENABLED``, the main job's setting) against float32, and the
ViT's explicit attention (``MODEL.VIT.FUSED_ATTENTION False``) against the fused one.

Tolerances, from bfloat16's 8 significant bits (a relative rounding of 2^-9 = 0.2% per value), measured
on these random tiny models (3 seeds, 32 and 64 px, 2026-12-04): the loss moves by at most 0.4%; the
gradient of all parameters together by 2-5% (relative L2) for PWE, the main job's variant, but by 4-12%
for SSE and 9-49% for CSE, whose attention logits autocast rounds to bfloat16 before the softmax over
the slices (the CUDA kernels keep them in float32), which makes the gradients of the structure tokens
and of the query projection ill-conditioned at initialisation. The bounds below are about twice those
(the GEMM's rounding differs between CPUs: AMX, AVX-512 BF16, emulated), and for CSE / SSE only rule out
a wrong gradient (zero, or of the wrong sign: relative error >= 1). A forward mistake (a layer in the
wrong dtype) shows in the loss."""
import copy

import pytest
import torch

import structtoken_d2  # noqa: F401  (compat shims before detectron2's submodules)
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from structtoken_d2.engine.mixed_precision import MixedPrecisionTrainer
from structtoken_d2.engine.trainer import Trainer
from tiny_runs import tiny_cfg

#: Loss: relative difference between the bf16-autocast and the float32 step.
LOSS_RTOL = 1e-2
#: Gradients of all parameters together: ||g_bf16 - g_f32|| / ||g_f32||, per variant.
GRAD_RTOL = {"PWE": 0.1, "SSE": 0.9, "CSE": 0.9}


def _batch(seed=0, n=2, size=32, num_classes=6):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8),
             "sem_seg": torch.randint(0, num_classes, (size, size), generator=g)} for _ in range(n)]


def _sgd_step(cfg, model, batch):
    """One step of the trainer the config builds, with plain SGD at lr 1: returns the loss and each
    parameter's change, which is minus its gradient."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)

    def data():
        while True:
            yield batch

    step = Trainer.build_step_trainer(cfg, model, data(), optimizer)
    with EventStorage(0) as storage:
        step.run_step()
        loss = storage.history("total_loss").latest()
    return step, loss, {n: (before[n] - p.detach()) for n, p in model.named_parameters()}


@pytest.mark.parametrize("variant", ["CSE", "SSE", "PWE"])
def test_bf16_autocast_training_step_follows_float32(variant):
    overrides = {"MODEL.STRUCTTOKEN.VARIANT": variant, "MODEL.VIT.EMBED_DIM": 64, "MODEL.VIT.NUM_HEADS": 2,
                 "MODEL.VIT.FUSED_ATTENTION": False}
    cfg32 = tiny_cfg(dict(overrides, **{"SOLVER.AMP.ENABLED": False}))
    cfg16 = tiny_cfg(dict(overrides, **{"SOLVER.AMP.ENABLED": True, "SOLVER.AMP.DTYPE": "bfloat16",
                                        "SOLVER.AMP.SCOPE": "model"}))
    torch.manual_seed(0)
    model32 = build_model(cfg32).train()
    model16 = copy.deepcopy(model32)
    batch = _batch()
    step32, loss32, grad32 = _sgd_step(cfg32, model32, batch)
    step16, loss16, grad16 = _sgd_step(cfg16, model16, batch)
    assert isinstance(step16, MixedPrecisionTrainer) and step16.dtype == torch.bfloat16
    assert not isinstance(step32, MixedPrecisionTrainer)
    assert all(p.dtype == torch.float32 for p in model16.parameters())  # master weights stay float32
    assert loss16 == pytest.approx(loss32, rel=LOSS_RTOL)
    assert loss16 != loss32  # bf16 did run: the same value would mean autocast was off
    flat32 = torch.cat([g.flatten() for g in grad32.values()])
    flat16 = torch.cat([grad16[n].flatten() for n in grad32])
    assert ((flat16 - flat32).norm() / flat32.norm()).item() < GRAD_RTOL[variant]


def test_explicit_attention_equals_the_fused_one():
    """MODEL.VIT.FUSED_ATTENTION False (softmax(q kᵀ) v written out) against True
    (scaled_dot_product_attention), in float64: the same function to rounding."""
    cfg = tiny_cfg({"MODEL.VIT.EMBED_DIM": 64, "MODEL.VIT.NUM_HEADS": 4, "MODEL.VIT.DEPTH": 2,
                    "MODEL.VIT.FUSED_ATTENTION": True})
    torch.manual_seed(0)
    fused = build_model(cfg).double().eval()
    cfg.defrost()
    cfg.MODEL.VIT.FUSED_ATTENTION = False
    explicit = build_model(cfg).double().eval()
    explicit.load_state_dict(fused.state_dict())
    assert [b.attn.fused_attn for b in explicit.backbone.vit.blocks] == [False, False]
    assert [b.attn.fused_attn for b in fused.backbone.vit.blocks] == [True, True]
    x = torch.randn(2, 3, 48, 80, dtype=torch.float64)
    a, b = fused.backbone(x)["last_feat"], explicit.backbone(x)["last_feat"]
    torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scope, head_dtype", [("model", torch.bfloat16), ("backbone", torch.float32)])
def test_amp_scope_says_what_autocast_covers(scope, head_dtype):
    """SOLVER.AMP.SCOPE "backbone": under the training step's autocast the ViT's matrix products run in
    bfloat16 and the head's convolutions in float32 (its input cast up)."""
    cfg = tiny_cfg({"SOLVER.AMP.ENABLED": True, "SOLVER.AMP.SCOPE": scope})
    model = build_model(cfg).train()
    dtypes = {"backbone": set(), "head": set()}
    for part, module, layer in [("backbone", model.backbone, torch.nn.Linear),
                                ("head", model.sem_seg_head, torch.nn.Conv2d)]:
        for m in module.modules():
            if isinstance(m, layer):
                m.register_forward_hook(lambda m, i, o, part=part: dtypes[part].add(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(_batch())
    assert dtypes == {"backbone": {torch.bfloat16}, "head": {head_dtype}}


def test_amp_scope_backbone_training_step_follows_float32():
    """The main job's setting: bf16 in the backbone only; loss and gradients against float32 as above
    (measured: loss 0.1%, gradients 1-2%, closer than with the whole model in bfloat16)."""
    cfg32 = tiny_cfg({"MODEL.VIT.EMBED_DIM": 64, "SOLVER.AMP.ENABLED": False})
    cfg16 = tiny_cfg({"MODEL.VIT.EMBED_DIM": 64, "SOLVER.AMP.ENABLED": True, "SOLVER.AMP.SCOPE": "backbone"})
    torch.manual_seed(0)
    model32 = build_model(cfg32).train()
    model16 = copy.deepcopy(model32)
    model16.head_in_float32 = True
    _, loss32, grad32 = _sgd_step(cfg32, model32, _batch())
    _, loss16, grad16 = _sgd_step(cfg16, model16, _batch())
    assert loss16 == pytest.approx(loss32, rel=LOSS_RTOL) and loss16 != loss32
    flat32 = torch.cat([g.flatten() for g in grad32.values()])
    flat16 = torch.cat([grad16[n].flatten() for n in grad32])
    assert ((flat16 - flat32).norm() / flat32.norm()).item() < GRAD_RTOL["PWE"]
