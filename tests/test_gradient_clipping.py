"""SOLVER.CLIP_GRADIENTS as foreach ops: the same updates as Detectron2's per-parameter clipping loop."""
import copy

import pytest
import torch

import structtoken_d2  # noqa: F401  (Detectron2 shims before detectron2.modeling)
from detectron2.modeling import build_model
from detectron2.solver.build import maybe_add_gradient_clipping
from structtoken_d2.engine.gradient_clipping import build_gradient_clipper, with_gradient_clipping
from structtoken_d2.engine.optimizer import build_optimizer
from tiny_runs import tiny_cfg


def clip_cfg(clip_type, norm_type=2.0):
    return tiny_cfg({"SOLVER.CLIP_GRADIENTS.CLIP_TYPE": clip_type, "SOLVER.CLIP_GRADIENTS.CLIP_VALUE": 0.5,
                     "SOLVER.CLIP_GRADIENTS.NORM_TYPE": norm_type})


def two_parameter_groups():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    decay = [p for n, p in model.named_parameters() if not n.startswith("1.")]
    return model, [{"params": decay, "lr": 1e-2},
                   {"params": list(model[1].parameters()), "lr": 2e-2, "weight_decay": 0.0}]


def train_steps(model, optimizer, steps=5):
    """``steps`` updates from fresh gradients of mixed sizes (every other parameter's far above the
    clip threshold), the learning rates changed between steps as a scheduler does."""
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        for i, p in enumerate(model.parameters()):
            g = torch.Generator().manual_seed(100 * step + i)
            p.grad = torch.randn(p.shape, generator=g) * (0.05 if i % 2 else 3.0)
        optimizer.step()
        for group in optimizer.param_groups:
            group["lr"] *= 0.7


@pytest.mark.parametrize("optimizer_class, kwargs", [(torch.optim.AdamW, {"weight_decay": 0.01}),
                                                     (torch.optim.SGD, {"momentum": 0.9})])
@pytest.mark.parametrize("clip_type, norm_type", [("norm", 2.0), ("norm", float("inf")), ("norm", 1.0),
                                                  ("value", 2.0)])
def test_foreach_clipping_updates_as_detectron2_bit_for_bit(optimizer_class, kwargs, clip_type, norm_type):
    """The reference is Detectron2's own optimizer class with its per-parameter clipping loop."""
    cfg = clip_cfg(clip_type, norm_type)
    reference_model, groups = two_parameter_groups()
    reference = maybe_add_gradient_clipping(cfg, optimizer_class)(groups, **kwargs)
    train_steps(reference_model, reference)
    model, groups = two_parameter_groups()
    clipper = build_gradient_clipper(cfg.SOLVER.CLIP_GRADIENTS)
    optimizer = with_gradient_clipping(optimizer_class, clipper)(groups, **kwargs)
    train_steps(model, optimizer)
    unclipped_model, groups = two_parameter_groups()
    train_steps(unclipped_model, optimizer_class(groups, **kwargs))
    params = zip(model.named_parameters(), reference_model.parameters(), unclipped_model.parameters())
    for i, ((name, p), q, u) in enumerate(params):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
        if i % 2 == 0:  # the large gradients: the clipping took effect
            assert (p - u).abs().max() > 1e-4, name
    assert optimizer.state_dict().keys() == reference.state_dict().keys()
    assert optimizer.state_dict()["param_groups"] == reference.state_dict()["param_groups"]


def test_build_optimizer_clips_as_configured():
    model = build_model(tiny_cfg())
    clipped = build_optimizer(tiny_cfg(), model)  # the synthetic config clips by norm
    assert type(clipped).__name__ == "AdamWWithGradientClip" and isinstance(clipped, torch.optim.AdamW)
    before = [p.detach().clone() for p in model.parameters()]
    clipped.step()  # no gradient yet: nothing to clip, nothing to update
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert type(build_optimizer(tiny_cfg({"SOLVER.CLIP_GRADIENTS.ENABLED": False}), model)) is torch.optim.AdamW
    with pytest.raises(ValueError, match="CLIP_TYPE must be one of \\['norm', 'value'\\], got 'full_model'"):
        build_optimizer(tiny_cfg({"SOLVER.CLIP_GRADIENTS.CLIP_TYPE": "full_model"}), model)


def test_the_adamw_of_the_config_is_fused_and_updates_as_the_per_tensor_one():
    cfg = tiny_cfg({"SOLVER.CLIP_GRADIENTS.ENABLED": False})
    torch.manual_seed(0)
    model = build_model(cfg)
    fused = build_optimizer(cfg, model)
    assert fused.defaults["fused"] is True
    reference_model = copy.deepcopy(model)
    groups = [dict(g, params=[dict(reference_model.named_parameters())[n] for n in names])
              for g, names in zip(fused.param_groups, _group_names(model, fused))]
    reference = torch.optim.AdamW([{k: v for k, v in g.items() if k != "fused"} for g in groups], fused=False)
    for step in range(3):
        for m in (model, reference_model):
            for i, p in enumerate(m.parameters()):
                p.grad = torch.sin(torch.arange(p.numel(), dtype=torch.float32) + step + i).reshape(p.shape)
        fused.step()
        reference.step()
    for (name, p), q in zip(model.named_parameters(), reference_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
    assert max((p - q).abs().max() for p, q in zip(model.parameters(), build_model(cfg).parameters())) > 1e-4


def _group_names(model, optimizer):
    """The parameter names of each of ``optimizer``'s groups."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
