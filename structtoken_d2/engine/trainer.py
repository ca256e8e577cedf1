"""Detectron2 trainer of structtoken-d2: our data pipeline, optimizer, lr schedule, mixed precision,
evaluator and multi-scale + flip test-time augmentation."""
import logging
import os
import weakref
from collections import OrderedDict

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, SimpleTrainer, TrainerBase, create_ddp_model, hooks
from detectron2.evaluation import DatasetEvaluators, inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .. import ops
from ..data import build_dataset_mapper
from ..data.datasets import register_folder_datasets_from_config
from ..evaluation import PredictionImageWriter, SemSegEvaluator
from ..modeling.checkpoint import StructTokenCheckpointer
from ..modeling.test_time_augmentation import SemanticSegmentorWithTTA
from .dataset_checks import check_datasets, datasets_used
from .lr_scheduler import build_lr_scheduler
from .metrics_plot_hook import MetricsPlotHook
from .mixed_precision import MixedPrecisionTrainer, resolve_amp_dtype
from .optimizer import build_optimizer


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` whose step runs under ``torch.autocast`` with ``SOLVER.AMP.DTYPE`` on any
    device when ``SOLVER.AMP.ENABLED``, and whose builders are structtoken-d2's."""

    def __init__(self, cfg):
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        if not logging.getLogger("structtoken_d2").isEnabledFor(logging.INFO):
            setup_logger(distributed_rank=comm.get_rank(), name="structtoken_d2")
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        register_folder_datasets_from_config(cfg)
        check_datasets(cfg, datasets_used(cfg, training=True))  # seconds, before building the model
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        # DistributedDataParallel takes the GPU index of this process, and none for a CPU model
        on_gpu = torch.device(cfg.MODEL.DEVICE).type == "cuda"
        model = create_ddp_model(model, broadcast_buffers=False, device_ids=[comm.get_local_rank()] if on_gpu else None)
        self._trainer = self.build_step_trainer(cfg, model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = StructTokenCheckpointer(
            model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self),
            reinit_class_dependent=cfg.MODEL.STRUCTTOKEN.REINIT_CLASS_DEPENDENT_WEIGHTS,
        )
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

    def build_hooks(self):
        """Detectron2's hooks, plus: with ``TEST.AUG.ENABLED`` (and ``TEST.EVAL_AFTER_TRAIN``) a
        multi-scale + flip evaluation after training, placed before the writers so its results reach
        ``metrics.json`` / TensorBoard as ``<dataset>_TTA/sem_seg/*``; then (main process) the curves
        ``OUTPUT_DIR/curves.png``. Without ``TEST.EVAL_AFTER_TRAIN``, Detectron2's evaluation hook is
        a :class:`PeriodicEvalHook`."""
        ret = super().build_hooks()
        if not self.cfg.TEST.EVAL_AFTER_TRAIN:
            ret = [PeriodicEvalHook(h._period, h._func) if isinstance(h, hooks.EvalHook) else h for h in ret]
        elif self.cfg.TEST.AUG.ENABLED:
            writers = [i for i, h in enumerate(ret) if isinstance(h, hooks.PeriodicWriter)]
            tta = hooks.EvalHook(0, lambda: self.test_with_TTA(self.cfg, self.model))
            ret.insert(writers[0] if writers else len(ret), tta)
        if comm.is_main_process():
            ret.append(MetricsPlotHook(self.cfg.OUTPUT_DIR))
        return ret

    @classmethod
    def build_model(cls, cfg):
        """Detectron2's (the model is logged), then which ``structtoken_d2.ops`` implementation runs."""
        model = super().build_model(cfg)
        logging.getLogger(__name__).info("structtoken_d2.ops on %s: %s", cfg.MODEL.DEVICE,
                                         ops.implementation_summary(cfg.MODEL.DEVICE, cfg.MODEL.COMPILE))
        return model

    @staticmethod
    def build_step_trainer(cfg, model, data_loader, optimizer) -> SimpleTrainer:
        """The object whose ``run_step()`` is one training iteration: under ``torch.autocast`` with
        ``SOLVER.AMP.DTYPE`` when ``SOLVER.AMP.ENABLED`` (also used by ``tools/benchmark_model.py``)."""
        if not cfg.SOLVER.AMP.ENABLED:
            return SimpleTrainer(model, data_loader, optimizer)
        device_type = torch.device(cfg.MODEL.DEVICE).type
        dtype = resolve_amp_dtype(cfg.SOLVER.AMP.DTYPE, device_type)
        return MixedPrecisionTrainer(model, data_loader, optimizer, device_type, dtype)

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
        """The test loader; with ``TEST.EVAL_NUM_IMAGES`` > 0, of the first that many images only."""
        mapper = build_dataset_mapper(cfg, is_train=False, resize_to_test_scale=resize_to_test_scale)
        if cfg.TEST.EVAL_NUM_IMAGES > 0:
            records = DatasetCatalog.get(dataset_name)
            logging.getLogger(__name__).info("Evaluating the first %d of the %d images of %s (TEST.EVAL_NUM_IMAGES)",
                                             min(cfg.TEST.EVAL_NUM_IMAGES, len(records)), len(records), dataset_name)
            return build_detection_test_loader(records[: cfg.TEST.EVAL_NUM_IMAGES], mapper=mapper,
                                               num_workers=cfg.DATALOADER.NUM_WORKERS)
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """Metrics (per-class tables in ``output_folder``, default ``OUTPUT_DIR/inference``), plus the
        first ``TEST.PREDICTION_IMAGES`` predictions saved as images under ``output_folder/predictions``."""
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
        if evaluator_type != "sem_seg":
            raise ValueError(
                f"Dataset '{dataset_name}' has evaluator_type {evaluator_type!r}; structtoken-d2 evaluates "
                f"'sem_seg' datasets only (register it with stuff_classes and evaluator_type='sem_seg')"
            )
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        evaluators = [SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder)]
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


class PeriodicEvalHook(hooks.EvalHook):
    """Detectron2's ``EvalHook`` without the evaluation after the last iteration
    (``TEST.EVAL_AFTER_TRAIN`` False); the evaluations every ``eval_period`` iterations all run,
    including one due at the last iteration (which ``EvalHook.after_step`` leaves to ``after_train``)."""

    def after_train(self):
        finished = self.trainer.iter + 1 >= self.trainer.max_iter  # as EvalHook: not after a failed run
        if finished and self._period > 0 and self.trainer.max_iter % self._period == 0:
            self._do_eval()
        del self._func  # as EvalHook.after_train, which frees the closure holding the trainer
