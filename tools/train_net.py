#!/usr/bin/env python
"""Train and evaluate StructToken with Detectron2.

    python tools/train_net.py --config-file configs/synthetic/structtoken_shapes.yaml
    python tools/train_net.py --config-file ... --resume          # continue from the last checkpoint
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS model_final.pth TEST.AUG.ENABLED True
    python tools/train_net.py --config-file ... --num-gpus 8      # one process per GPU

Without a GPU, MODEL.DEVICE is set to cpu and a single process is run.
"""
import logging
import sys

import structtoken_d2  # noqa: F401  (compat shims and registrations, before detectron2 submodules)
import torch
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup, hooks, launch
from detectron2.evaluation import verify_results
from structtoken_d2 import add_structtoken_config
from structtoken_d2.engine import Trainer
from structtoken_d2.modeling.checkpoint import StructTokenCheckpointer

logger = logging.getLogger("structtoken_d2")


def setup(args):
    """Config from defaults + file + command-line overrides; CPU when no GPU is present."""
    cfg = get_cfg()
    add_structtoken_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cpu_fallback = cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available()
    if cpu_fallback:
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    default_setup(cfg, args)
    if cpu_fallback:
        logger.warning("No CUDA GPU available: running on CPU (MODEL.DEVICE cpu)")
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        StructTokenCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test_with_TTA(cfg, model) if cfg.TEST.AUG.ENABLED else Trainer.test(cfg, model)
        verify_results(cfg, res)
        return res

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    if cfg.TEST.AUG.ENABLED:  # a final multi-scale + flip evaluation after training
        trainer.register_hooks([hooks.EvalHook(0, lambda: trainer.test_with_TTA(cfg, trainer.model))])
    return trainer.train()


def resolve_process_count(args):
    """Detectron2 v0.6's ``launch`` needs CUDA for more than one process: without a GPU, say so
    and run one process."""
    if torch.cuda.is_available():
        return args
    if args.num_machines > 1:
        sys.exit("Multi-machine training needs CUDA GPUs (NCCL); this machine has none. Run with --num-machines 1.")
    if args.num_gpus > 1:
        print(f"--num-gpus {args.num_gpus} ignored: no CUDA GPU on this machine, running 1 CPU process", file=sys.stderr)
        args.num_gpus = 1
    return args


if __name__ == "__main__":
    args = resolve_process_count(default_argument_parser().parse_args())
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
