"""Training: trainer, optimizer, learning-rate schedule and mixed precision."""
from .lr_scheduler import WarmupPolyParamScheduler, build_lr_scheduler
from .mixed_precision import MixedPrecisionTrainer
from .optimizer import build_optimizer, build_param_groups
from .trainer import Trainer

__all__ = [
    "MixedPrecisionTrainer",
    "Trainer",
    "WarmupPolyParamScheduler",
    "build_lr_scheduler",
    "build_optimizer",
    "build_param_groups",
]
