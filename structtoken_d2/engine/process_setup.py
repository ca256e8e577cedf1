"""Per-process set-up of a training or evaluation job: everything on the main process, only
warnings and errors (to stderr, no files) on the others."""
import logging
import sys

import torch
from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

#: Loggers set up on every process: Detectron2's, fvcore's and ours.
LOGGER_NAMES = ("detectron2", "fvcore", "structtoken_d2")


def setup_process(cfg, args) -> None:
    """Detectron2's ``default_setup`` on rank 0 (log file ``OUTPUT_DIR/log.txt``, ``config.yaml``,
    environment and config logged), with our ``structtoken_d2`` logger routed like Detectron2's.
    Ranks > 0 write no file: their loggers print warnings and errors to stderr, prefixed with the
    rank; their random seed (``SEED + rank``) and cuDNN benchmark mode are set as ``default_setup`` does."""
    rank = comm.get_rank()
    if rank == 0:
        default_setup(cfg, args)
        setup_logger(cfg.OUTPUT_DIR, distributed_rank=0, name="structtoken_d2")
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter(f"[rank {rank}] %(asctime)s %(name)s %(levelname)s: %(message)s",
                                           datefmt="%m/%d %H:%M:%S"))
    for name in LOGGER_NAMES:
        named = logging.getLogger(name)
        named.setLevel(logging.DEBUG)  # as setup_logger: the handler filters, so nobody re-sets it up
        named.propagate = False
        named.handlers = [handler]
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + rank)
    if not getattr(args, "eval_only", False):
        torch.backends.cudnn.benchmark = cfg.CUDNN_BENCHMARK
