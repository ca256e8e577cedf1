"""Helpers of the tests that train or run the tools end to end: a tiny model config, a generated
folder dataset, a hook that interrupts training, loading a tool as a module, and loggers restored
after a test that sets them up."""
import contextlib
import importlib.util
import logging
from pathlib import Path

import cv2
import numpy as np

import structtoken_d2  # noqa: F401
from detectron2.config import get_cfg
from detectron2.engine import HookBase
from structtoken_d2 import add_structtoken_config

REPO = Path(__file__).resolve().parents[1]
SHAPES_CONFIG = REPO / "configs/synthetic/structtoken_shapes.yaml"

#: Overrides shrinking the synthetic config to a 1-block, 32-wide model on 32 x 32 crops (seconds on a CPU),
#: trained in float32 (tests/test_mixed_precision.py covers the main job's bfloat16 autocast).
TINY_OPTS = [
    "MODEL.DEVICE", "cpu", "MODEL.VIT.EMBED_DIM", 32, "MODEL.VIT.DEPTH", 1, "MODEL.VIT.NUM_HEADS", 2,
    "MODEL.VIT.IMG_SIZE", [32, 32], "MODEL.STRUCTTOKEN.NUM_BLOCKS", 1, "MODEL.STRUCTTOKEN.TOKEN_SIZE", [2, 2],
    "INPUT.CROP.SIZE", [32, 32], "INPUT.RESIZE_SCALE", [32, 32], "SOLVER.IMS_PER_BATCH", 2,
    "SOLVER.MAX_ITER", 2, "SOLVER.WARMUP_ITERS", 1, "SOLVER.CHECKPOINT_PERIOD", 1000,
    "DATALOADER.NUM_WORKERS", 0, "TEST.EVAL_PERIOD", 0, "TEST.AUG.ENABLED", False, "TEST.PREDICTION_IMAGES", 0,
    "TEST.SLIDE_CROP_SIZE", [32, 32], "TEST.SLIDE_STRIDE", [21, 21], "TEST.SCALE", [32, 32],
    "INPUT.MIN_SIZE_TEST", 32, "INPUT.MAX_SIZE_TEST", 32, "SOLVER.AMP.ENABLED", False,
]


def tiny_opts(overrides=None):
    """:data:`TINY_OPTS` with ``overrides`` ({"KEY.NAME": value}) as a flat KEY VALUE list."""
    opts = dict(zip(TINY_OPTS[::2], TINY_OPTS[1::2]))
    opts.update(overrides or {})
    return [x for kv in opts.items() for x in kv]


def tiny_cfg(overrides=None):
    """The synthetic config with :func:`tiny_opts`."""
    cfg = get_cfg()
    add_structtoken_config(cfg)
    cfg.merge_from_file(str(SHAPES_CONFIG))
    cfg.merge_from_list(tiny_opts(overrides))
    return cfg


def write_folder_dataset(root: Path, num_classes: int, splits=None, size=(24, 40)):
    """``root/images/<split>/<i>.png`` and ``root/labels/<split>/<i>.png``: a background (class 0)
    with a rectangle of class ``1 + i % (num_classes - 1)`` whose colour encodes the class, and a
    2-pixel ignore (255) border. Returns ``root``."""
    splits = splits or {"train": 4, "val": 2}
    h, w = size
    for split, count in splits.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            cls = 1 + i % (num_classes - 1)
            label = np.zeros((h, w), np.uint8)
            label[4 + i % 3 : h - 4, 6 : w - 6 - i % 5] = cls
            label[:2] = 255
            image = np.full((h, w, 3), 40, np.uint8)
            image[label == cls] = (37 * cls % 256, 255 - 50 * cls % 256, 90)
            cv2.imwrite(str(root / "images" / split / f"{i}.png"), image)
            cv2.imwrite(str(root / "labels" / split / f"{i}.png"), label)
    return root


class Interrupt(HookBase):
    """Stops training with a KeyboardInterrupt (like Ctrl-C) after iteration ``after_iter``, once
    the checkpointer has run."""

    def __init__(self, after_iter):
        self.after_iter = after_iter

    def after_step(self):
        if self.trainer.iter == self.after_iter:
            raise KeyboardInterrupt


def load_tool(name: str):
    """``tools/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def restored_loggers(names=("detectron2", "fvcore", "structtoken_d2")):
    """Put the named loggers' handlers, level and propagation back as they were on exit (a tool
    run in-process sets them up; other tests may rely on propagation to the root logger). Detectron2's
    ``setup_logger`` caches its calls: a second run with the same OUTPUT_DIR logs nothing there."""
    saved = {n: (list(logging.getLogger(n).handlers), logging.getLogger(n).level, logging.getLogger(n).propagate)
             for n in names}
    try:
        yield
    finally:
        for n, (handlers, level, propagate) in saved.items():
            logger = logging.getLogger(n)
            logger.handlers, logger.level, logger.propagate = handlers, level, propagate


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@contextlib.contextmanager
def captured_logs(name="structtoken_d2", level=logging.INFO):
    """The records (list, filled while inside) that the logger ``name`` and its children emit at
    ``level`` and up, whether or not it propagates to the root logger (caplog's)."""
    logger = logging.getLogger(name)
    handler, old_level = _Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(min(level, old_level) if old_level else level)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
