"""The authors' optimizer: AdamW without weight decay on norms, position embeddings, the class
token and the structure tokens, and a larger learning rate for the decode head."""
from typing import Any, Callable, Dict, List, Sequence

import torch
from detectron2.solver.build import maybe_add_gradient_clipping, reduce_param_groups
from torch import nn

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
    """Optimizer parameter groups: weight decay 0 for parameters of norm layers and for those whose
    name contains one of ``no_decay_keys``; lr ``base_lr * head_lr_multiplier`` for the decode
    head (``sem_seg_head.*``). Groups with equal settings are merged."""
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


def _adamw(cfg, params) -> torch.optim.Optimizer:
    cls = maybe_add_gradient_clipping(cfg, torch.optim.AdamW)
    return cls(params, lr=cfg.SOLVER.BASE_LR, betas=tuple(cfg.SOLVER.BETAS), weight_decay=cfg.SOLVER.WEIGHT_DECAY)


def _sgd(cfg, params) -> torch.optim.Optimizer:
    cls = maybe_add_gradient_clipping(cfg, torch.optim.SGD)
    return cls(params, lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM, nesterov=cfg.SOLVER.NESTEROV)


#: cfg.SOLVER.OPTIMIZER -> builder(cfg, param_groups).
OPTIMIZERS: Dict[str, Callable] = {"ADAMW": _adamw, "SGD": _sgd}


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.SOLVER.OPTIMIZER`` over :func:`build_param_groups`, with
    Detectron2's ``SOLVER.CLIP_GRADIENTS``."""
    if cfg.SOLVER.OPTIMIZER not in OPTIMIZERS:
        raise ValueError(f"SOLVER.OPTIMIZER must be one of {sorted(OPTIMIZERS)}, got {cfg.SOLVER.OPTIMIZER!r}")
    params = build_param_groups(
        model,
        cfg.SOLVER.BASE_LR,
        cfg.SOLVER.WEIGHT_DECAY,
        cfg.SOLVER.HEAD_LR_MULTIPLIER,
        cfg.SOLVER.NO_WEIGHT_DECAY_KEYS,
    )
    return OPTIMIZERS[cfg.SOLVER.OPTIMIZER](cfg, params)
