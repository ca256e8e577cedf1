"""Training: trainer, optimizer, learning-rate schedule, mixed precision, and the launch and set-up
of its processes; inference with a trained model."""
from .launch import ProcessFailedError, add_launch_arguments, launch
from .lr_scheduler import WarmupPolyParamScheduler, build_lr_scheduler
from .mixed_precision import MixedPrecisionTrainer
from .optimizer import build_optimizer, build_param_groups
from .predictor import StructTokenPredictor, load_trained_model
from .process_setup import setup_process
from .trainer import Trainer

__all__ = [
    "MixedPrecisionTrainer",
    "ProcessFailedError",
    "StructTokenPredictor",
    "Trainer",
    "WarmupPolyParamScheduler",
    "add_launch_arguments",
    "build_lr_scheduler",
    "build_optimizer",
    "build_param_groups",
    "launch",
    "load_trained_model",
    "setup_process",
]
