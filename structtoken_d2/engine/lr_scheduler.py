"""mmseg's poly learning-rate schedule with linear warmup, as ``SOLVER.LR_SCHEDULER_NAME: WarmupPolyLR``."""
from typing import Callable, Dict

import torch
from detectron2.solver import LRMultiplier
from detectron2.solver import build_lr_scheduler as build_detectron2_lr_scheduler
from fvcore.common.param_scheduler import ParamScheduler


class WarmupPolyParamScheduler(ParamScheduler):
    """Multiplier of the base lr at training progress ``where`` in [0, 1] (iteration / max_iter):
    ``(1 - where) ** power``, times ``1 - (1 - iter / warmup_iters) * (1 - warmup_ratio)`` during
    the first ``warmup_iters`` iterations (mmseg ``PolyLrUpdaterHook`` with linear warmup, min lr 0)."""

    def __init__(self, max_iter: int, power: float, warmup_iters: int, warmup_ratio: float):
        if max_iter <= 0:
            raise ValueError(f"SOLVER.MAX_ITER must be positive, got {max_iter}")
        self.max_iter, self.power = max_iter, power
        self.warmup_iters, self.warmup_ratio = warmup_iters, warmup_ratio

    def __call__(self, where: float) -> float:
        value = max(1.0 - where, 0.0) ** self.power
        iteration = where * self.max_iter
        if iteration < self.warmup_iters:
            value *= 1.0 - (1.0 - iteration / self.warmup_iters) * (1.0 - self.warmup_ratio)
        return value


def _warmup_poly(cfg, optimizer: torch.optim.Optimizer) -> LRMultiplier:
    if cfg.SOLVER.WARMUP_METHOD != "linear":
        raise ValueError(f"WarmupPolyLR supports SOLVER.WARMUP_METHOD 'linear' only, got {cfg.SOLVER.WARMUP_METHOD!r}")
    schedule = WarmupPolyParamScheduler(
        cfg.SOLVER.MAX_ITER, cfg.SOLVER.POLY_LR_POWER, cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.WARMUP_FACTOR
    )
    return LRMultiplier(optimizer, multiplier=schedule, max_iter=cfg.SOLVER.MAX_ITER)


#: Schedulers added by structtoken-d2; other names go to Detectron2's build_lr_scheduler.
LR_SCHEDULERS: Dict[str, Callable] = {"WarmupPolyLR": _warmup_poly}


def build_lr_scheduler(cfg, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler._LRScheduler:
    """The scheduler named by ``cfg.SOLVER.LR_SCHEDULER_NAME``."""
    builder = LR_SCHEDULERS.get(cfg.SOLVER.LR_SCHEDULER_NAME, build_detectron2_lr_scheduler)
    return builder(cfg, optimizer)
