#!/usr/bin/env python
"""Train and evaluate StructToken with Detectron2.

    python tools/train_net.py --config-file configs/synthetic/structtoken_shapes.yaml
    python tools/train_net.py --config-file ... --resume          # continue from the last checkpoint
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS model_final.pth TEST.AUG.ENABLED True
    python tools/train_net.py --config-file ... --num-gpus 8      # one process per GPU (NCCL)
    python tools/train_net.py --config-file ... --num-gpus 8 --num-machines 2 --machine-rank 0 \\
        --dist-url tcp://HOST0:29500                              # machine 0 of 2 (machine 1: --machine-rank 1)
    torchrun --nproc_per_node 8 tools/train_net.py --config-file ...   # processes started by torchrun

Without a GPU, MODEL.DEVICE is set to cpu and ``--num-gpus N`` starts N CPU processes (gloo).
SOLVER.IMS_PER_BATCH is the batch of all processes together; only rank 0 writes files.
``--dist-timeout`` (minutes, default 30) bounds every wait of one process on another.
"""
import logging
import os
import sys
from datetime import timedelta

import structtoken_d2  # noqa: F401  (compat shims and registrations, before detectron2 submodules)
from detectron2.engine import default_argument_parser
from detectron2.evaluation import verify_results
from structtoken_d2.config_loading import load_config, use_cpu_without_gpu
from structtoken_d2.data.datasets import register_folder_datasets_from_config
from structtoken_d2.engine import ProcessFailedError, Trainer, add_launch_arguments, launch, setup_process
from structtoken_d2.engine.dataset_checks import check_datasets, datasets_used
from structtoken_d2.engine.user_errors import exit_on_user_error
from structtoken_d2.modeling.backbone import check_vit_weights_file
from structtoken_d2.modeling.checkpoint import LAST_CHECKPOINT_TAG, StructTokenCheckpointer, check_trained_weights

logger = logging.getLogger("structtoken_d2")


def build_parser():
    """Detectron2's ``default_argument_parser`` (``--config-file``, ``--resume``, ``--eval-only``,
    ``--num-gpus``, ``--num-machines``, ``--machine-rank``, ``--dist-url``, trailing ``KEY VALUE``
    overrides) with ``--dist-timeout``, described by this module's docstring."""
    epilog = "Trailing KEY VALUE pairs override the config: Detectron2's keys and those of structtoken_d2/config.py."
    parser = add_launch_arguments(default_argument_parser(epilog=epilog))
    parser.description = __doc__
    return parser


def checked_config(args):
    """Config from defaults + file + command-line overrides (:func:`load_config`), after checking the
    weight files it names: ``MODEL.VIT.WEIGHTS`` and ``MODEL.WEIGHTS`` when set (unless ``--resume``
    finds a checkpoint in ``OUTPUT_DIR``), and that ``--eval-only`` has a model to evaluate (Detectron2
    would evaluate a random one). Writes nothing."""
    cfg = load_config(args.config_file, args.opts)
    check_vit_weights_file(cfg.MODEL.VIT.WEIGHTS)
    resuming = args.resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, LAST_CHECKPOINT_TAG))
    if args.eval_only and not resuming:
        check_trained_weights(cfg.MODEL.WEIGHTS, hint=" to evaluate, or --resume to evaluate the last checkpoint "
                              "of OUTPUT_DIR")
    elif cfg.MODEL.WEIGHTS and not resuming:
        check_trained_weights(cfg.MODEL.WEIGHTS, hint=" to start from, or '' to train from MODEL.VIT.WEIGHTS")
    return cfg


def setup(args):
    """:func:`checked_config`, on CPU when no GPU is present; then the process set-up (logs, OUTPUT_DIR)."""
    cfg = checked_config(args)
    cpu_fallback = use_cpu_without_gpu(cfg)
    cfg.freeze()
    setup_process(cfg, args)
    if cpu_fallback:
        logger.warning("No CUDA GPU available: running on CPU (MODEL.DEVICE cpu)")
    return cfg


@exit_on_user_error  # bad config keys, data files, datasets, class counts, checkpoints: one line, no traceback
def main(args):
    cfg = setup(args)
    if args.eval_only:
        register_folder_datasets_from_config(cfg)  # (Trainer does it when training)
        check_datasets(cfg, datasets_used(cfg, training=False))  # seconds, before building the model
        model = Trainer.build_model(cfg)
        StructTokenCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test_with_TTA(cfg, model) if cfg.TEST.AUG.ENABLED else Trainer.test(cfg, model)
        verify_results(cfg, res)
        return res

    trainer = Trainer(cfg)  # with TEST.AUG.ENABLED, its hooks end with a multi-scale + flip evaluation
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


@exit_on_user_error
def check_arguments(args):
    """:func:`checked_config` before any process starts: a missing file, an unknown key, a wrong value
    or no model to evaluate is one line, not a traceback from every process."""
    checked_config(args)


if __name__ == "__main__":
    args = build_parser().parse_args()
    print("Command Line Args:", args)
    check_arguments(args)
    try:
        launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
            timeout=timedelta(minutes=args.dist_timeout),
        )
    except ProcessFailedError as e:
        sys.exit(f"{os.path.basename(__file__)}: {e}")
