"""Detectron2 trainer of structtoken-d2: our data pipeline, optimizer, lr schedule, mixed precision,
evaluator and multi-scale + flip test-time augmentation."""
import logging
import os
import weakref
from collections import OrderedDict

import torch
from detectron2.data import MetadataCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, SimpleTrainer, TrainerBase, create_ddp_model
from detectron2.evaluation import DatasetEvaluators, inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..data import build_dataset_mapper
from ..evaluation import PredictionImageWriter, SemSegEvaluator
from ..modeling.checkpoint import StructTokenCheckpointer
from ..modeling.test_time_augmentation import SemanticSegmentorWithTTA
from .lr_scheduler import build_lr_scheduler
from .mixed_precision import MixedPrecisionTrainer, resolve_amp_dtype
from .optimizer import build_optimizer


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` whose step runs under ``torch.autocast`` with ``SOLVER.AMP.DTYPE`` on any
    device when ``SOLVER.AMP.ENABLED``, and whose builders are structtoken-d2's."""

    def __init__(self, cfg):
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, broadcast_buffers=False)
        if cfg.SOLVER.AMP.ENABLED:
            device_type = torch.device(cfg.MODEL.DEVICE).type
            dtype = resolve_amp_dtype(cfg.SOLVER.AMP.DTYPE, device_type)
            self._trainer = MixedPrecisionTrainer(model, data_loader, optimizer, device_type, dtype)
        else:
            self._trainer = SimpleTrainer(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = StructTokenCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def state_dict(self):
        """Iteration and hook states (Detectron2 v0.6 saves no more) plus the step trainer's
        optimizer (and grad scaler) state, so that ``--resume`` continues AdamW's moments."""
        ret = super().state_dict()
        ret["step_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "step_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["step_trainer"])

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=build_dataset_mapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name, resize_to_test_scale: bool = True):
        mapper = build_dataset_mapper(cfg, is_train=False, resize_to_test_scale=resize_to_test_scale)
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """Metrics, plus the first ``TEST.PREDICTION_IMAGES`` predictions saved as images under
        ``output_folder`` (default ``OUTPUT_DIR/inference``)/predictions."""
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
        if evaluator_type != "sem_seg":
            raise ValueError(
                f"Dataset '{dataset_name}' has evaluator_type {evaluator_type!r}; structtoken-d2 evaluates "
                f"'sem_seg' datasets only (register it with stuff_classes and evaluator_type='sem_seg')"
            )
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        evaluators = [SemSegEvaluator(dataset_name, distributed=True)]
        if cfg.TEST.PREDICTION_IMAGES > 0:
            image_dir = os.path.join(output_folder, "predictions", dataset_name)
            evaluators.append(PredictionImageWriter(dataset_name, image_dir, cfg.TEST.PREDICTION_IMAGES))
        return DatasetEvaluators(evaluators)

    @classmethod
    def test_with_TTA(cls, cfg, model):
        """Evaluate ``model`` on ``cfg.DATASETS.TEST`` with multi-scale (``TEST.AUG.RATIOS`` of
        ``TEST.SCALE``) + flip (``TEST.AUG.FLIP``) test-time augmentation."""
        logger = logging.getLogger("detectron2.trainer")
        logger.info("Running inference with multi-scale %s + flip=%s test-time augmentation",
                    list(cfg.TEST.AUG.RATIOS), cfg.TEST.AUG.FLIP)
        tta_model = SemanticSegmentorWithTTA(cfg, model)
        results = OrderedDict()
        for dataset_name in cfg.DATASETS.TEST:
            loader = cls.build_test_loader(cfg, dataset_name, resize_to_test_scale=False)
            evaluator = cls.build_evaluator(cfg, dataset_name, os.path.join(cfg.OUTPUT_DIR, "inference_TTA"))
            results[dataset_name] = inference_on_dataset(tta_model, loader, evaluator)
            if comm.is_main_process():
                logger.info("Evaluation results for %s with test-time augmentation in csv format:", dataset_name)
                print_csv_format(results[dataset_name])
        return OrderedDict({f"{k}_TTA": v for k, v in results.items()})
