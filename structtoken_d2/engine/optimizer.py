"""The optimizer and its parameter groups (``SOLVER.PARAM_GROUPS``): the authors' rule, mmcv's
``paramwise_cfg.custom_keys`` matched on the authors' parameter names, or this project's rule (no
weight decay on norm layers and a few named parameters, a larger learning rate for the head)."""
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

import torch
from detectron2.solver.build import reduce_param_groups
from torch import nn

from ..modeling.mmseg_names import ours_to_authors
from .compiled_optimizer_step import compile_optimizer_step
from .gradient_clipping import build_gradient_clipper, with_gradient_clipping

_NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)
#: Prefix of the decode head's parameter names (Detectron2's ``sem_seg_head``).
HEAD_PREFIX = "sem_seg_head."


def build_param_groups(
    model: nn.Module,
    base_lr: float,
    weight_decay: float,
    head_lr_multiplier: float,
    no_decay_keys: Sequence[str],
) -> List[Dict[str, Any]]:
    """Parameter groups of ``SOLVER.PARAM_GROUPS "norm_layers"``: weight decay 0 for parameters of
    norm layers and for those whose name contains one of ``no_decay_keys``; lr
    ``base_lr * head_lr_multiplier`` for the decode head (``sem_seg_head.*``). Groups with equal
    settings are merged."""
    groups = []
    seen = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or param in seen:
                continue
            seen.add(param)
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            no_decay = isinstance(module, _NORM_TYPES) or any(k in full_name for k in no_decay_keys)
            is_head = full_name.startswith(HEAD_PREFIX)
            groups.append(
                {
                    "params": [param],
                    "lr": base_lr * (head_lr_multiplier if is_head else 1.0),
                    "weight_decay": 0.0 if no_decay else weight_decay,
                }
            )
    return reduce_param_groups(groups)


def build_mmcv_custom_key_groups(
    model: nn.Module,
    base_lr: float,
    weight_decay: float,
    custom_keys: Mapping[str, Tuple[float, float]],
) -> List[Dict[str, Any]]:
    """Parameter groups as mmcv's ``DefaultOptimizerConstructor`` builds them from
    ``paramwise_cfg.custom_keys``, applied to each parameter's name in the authors' model
    (:func:`ours_to_authors`). ``custom_keys``: ``{key: (lr_mult, decay_mult)}``; keys are tried
    longest first (alphabetically among equal lengths) and the first one contained in the name
    gives lr ``base_lr * lr_mult`` and weight decay ``weight_decay * decay_mult``; parameters
    matching no key get ``base_lr`` and ``weight_decay``. Groups with equal settings are merged."""
    keys = sorted(sorted(custom_keys), key=len, reverse=True)
    groups = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        authors_name = ours_to_authors(name)
        if authors_name is None:
            raise ValueError(f"SOLVER.PARAM_GROUPS 'mmcv_custom_keys': parameter {name} has no name in the "
                             f"authors' model to match the custom keys against; use 'norm_layers'")
        lr_mult, decay_mult = next((custom_keys[k] for k in keys if k in authors_name), (1.0, 1.0))
        groups.append({"params": [param], "lr": base_lr * lr_mult, "weight_decay": weight_decay * decay_mult})
    return reduce_param_groups(groups)


_CUSTOM_KEY_FIELDS = ("LR_MULT", "DECAY_MULT")


def custom_keys_from_config(node: Mapping) -> Dict[str, Tuple[float, float]]:
    """``SOLVER.CUSTOM_KEYS`` -> ``{key: (lr_mult, decay_mult)}`` (each 1.0 when not given)."""
    keys = {}
    for key, fields in node.items():
        unknown = sorted(set(fields) - set(_CUSTOM_KEY_FIELDS)) if isinstance(fields, Mapping) else [fields]
        if unknown:
            raise ValueError(f"SOLVER.CUSTOM_KEYS.{key}: unknown entries {unknown}; give a mapping with "
                             f"{' and/or '.join(_CUSTOM_KEY_FIELDS)}, e.g. {{LR_MULT: 8.0}}")
        keys[key] = (float(fields.get("LR_MULT", 1.0)), float(fields.get("DECAY_MULT", 1.0)))
    return keys


def _norm_layer_groups(cfg, model: nn.Module) -> List[Dict[str, Any]]:
    s = cfg.SOLVER
    return build_param_groups(model, s.BASE_LR, s.WEIGHT_DECAY, s.HEAD_LR_MULTIPLIER, s.NO_WEIGHT_DECAY_KEYS)


def _mmcv_custom_key_groups(cfg, model: nn.Module) -> List[Dict[str, Any]]:
    s = cfg.SOLVER
    return build_mmcv_custom_key_groups(model, s.BASE_LR, s.WEIGHT_DECAY, custom_keys_from_config(s.CUSTOM_KEYS))


#: cfg.SOLVER.PARAM_GROUPS -> builder(cfg, model) of the parameter groups.
PARAM_GROUP_RULES: Dict[str, Callable] = {
    "norm_layers": _norm_layer_groups,
    "mmcv_custom_keys": _mmcv_custom_key_groups,
}


def _adamw(cfg) -> Tuple[type, Dict[str, Any]]:
    """AdamW, fused (one kernel over all parameters; on a CPU the per-tensor loop took 12.7 ms per step of
    the main job's 139 tensors, the fused one 4.5 ms) unless MODEL.COMPILE compiles the step."""
    return torch.optim.AdamW, {"lr": cfg.SOLVER.BASE_LR, "betas": tuple(cfg.SOLVER.BETAS),
                               "weight_decay": cfg.SOLVER.WEIGHT_DECAY, "fused": not cfg.MODEL.COMPILE}


def _sgd(cfg) -> Tuple[type, Dict[str, Any]]:
    return torch.optim.SGD, {"lr": cfg.SOLVER.BASE_LR, "momentum": cfg.SOLVER.MOMENTUM,
                             "nesterov": cfg.SOLVER.NESTEROV}


#: cfg.SOLVER.OPTIMIZER -> builder(cfg) of (optimizer class, its keyword arguments).
OPTIMIZERS: Dict[str, Callable] = {"ADAMW": _adamw, "SGD": _sgd}


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.SOLVER.OPTIMIZER`` over the parameter groups of the
    ``cfg.SOLVER.PARAM_GROUPS`` rule, with Detectron2's ``SOLVER.CLIP_GRADIENTS`` (as foreach ops:
    :mod:`.gradient_clipping`); with ``MODEL.COMPILE``, its step compiled (:mod:`.compiled_optimizer_step`)."""
    if cfg.SOLVER.OPTIMIZER not in OPTIMIZERS:
        raise ValueError(f"SOLVER.OPTIMIZER must be one of {sorted(OPTIMIZERS)}, got {cfg.SOLVER.OPTIMIZER!r}")
    if cfg.SOLVER.PARAM_GROUPS not in PARAM_GROUP_RULES:
        raise ValueError(f"SOLVER.PARAM_GROUPS must be one of {sorted(PARAM_GROUP_RULES)}, "
                         f"got {cfg.SOLVER.PARAM_GROUPS!r}")
    params = PARAM_GROUP_RULES[cfg.SOLVER.PARAM_GROUPS](cfg, model)
    optimizer_class, kwargs = OPTIMIZERS[cfg.SOLVER.OPTIMIZER](cfg)
    clipper = build_gradient_clipper(cfg.SOLVER.CLIP_GRADIENTS)
    optimizer = with_gradient_clipping(optimizer_class, clipper)(params, **kwargs)
    return compile_optimizer_step(optimizer) if cfg.MODEL.COMPILE else optimizer
