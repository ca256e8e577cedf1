"""Whole-model benchmark (``tools/benchmark_model.py``): a training step and inference throughput of a
config's model on random inputs, for several variants timed in one run, calls interleaved.

A variant is an ops implementation ("kernels": the compiled ``structtoken_d2.ops`` where built;
"pytorch": ``STRUCTTOKEN_D2_FORCE_PYTORCH_OPS=1``) plus config overrides (e.g. ``MODEL.COMPILE True``,
``TEST.SLIDE_BATCH 1``). Every variant's model gets the weights of the first one. Scenarios:

- ``train``: one iteration of the trainer's step (:meth:`Trainer.build_step_trainer`: forward, loss,
  backward, optimizer step, under autocast when ``SOLVER.AMP.ENABLED``) on a batch of
  ``SOLVER.IMS_PER_BATCH`` random images and labels of the training crop size;
- ``infer ...``: the evaluation of a set of random images (one at a time, as the test loader gives
  them) through :class:`SemanticSegmentorWithTTA`: single-scale (ratio 1, no flip: the keep-ratio
  resize to ``TEST.SCALE``, the ``TEST.MODE`` inference, the resize back) and multi-scale + flip
  (``TEST.AUG.RATIOS``, ``TEST.AUG.FLIP``).

Per scenario and variant: median and quartiles of the wall time of a call (CUDA synchronised), median
process CPU time, images/s, peak memory, and the warm-up time (where ``torch.compile`` compiles).
"""
import copy
import itertools
import os
import shlex
import statistics
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from .. import ops
from ..modeling.test_time_augmentation import SemanticSegmentorWithTTA
from ..ops.timing import CallTimes, device_label, interleaved_times, peak_memory_bytes, peak_rss_bytes
from .optimizer import build_optimizer
from .trainer import Trainer


#: Ops implementation name -> whether it forces the PyTorch reference.
OPS_IMPLEMENTATIONS = {"kernels": False, "pytorch": True}
#: Inference scenarios: name -> whether it is multi-scale + flip (else single-scale).
INFERENCE_SCENARIOS = {"single-scale": False, "multi-scale+flip": True}


@dataclass(frozen=True)
class Variant:
    """An ops implementation and config overrides ``((KEY, VALUE), ...)`` (values as on a command line)."""

    ops: str
    overrides: Tuple[Tuple[str, str], ...] = ()

    @property
    def name(self) -> str:
        return ", ".join([self.ops] + [f"{key.split('.')[-1]}={value}" for key, value in self.overrides])


def variants(ops_names: Sequence[str], vary: Sequence[Sequence[str]]) -> List[Variant]:
    """Every ops implementation for every combination of the ``vary`` lists ``[KEY, V1, V2, ...]``,
    in the order given (the first variant is the baseline of the speed ratios)."""
    for name in ops_names:
        if name not in OPS_IMPLEMENTATIONS:
            raise ValueError(f"ops implementation {name!r}; valid: {', '.join(OPS_IMPLEMENTATIONS)}")
    for entry in vary:
        if len(entry) < 2:
            raise ValueError(f"--vary needs a config key and at least one value, got {list(entry)}")
    choices = [[(entry[0], value) for value in entry[1:]] for entry in vary]
    return [Variant(name, tuple(combo)) for combo in itertools.product(*choices) for name in ops_names]


@dataclass
class Row:
    """One scenario x variant result; times in seconds per call, ``speedup`` = baseline median / this
    median (wall time; ``cpu_speedup`` likewise with process CPU time)."""

    scenario: str
    variant: str
    device: str
    images_per_call: int
    median_s: float
    p25_s: float
    p75_s: float
    cpu_median_s: float
    images_per_s: float
    speedup: float
    cpu_speedup: float
    peak_mem_mib: Optional[float]
    warmup_s: float
    iters: int


def training_crop_size(cfg) -> Tuple[int, int]:
    """``INPUT.CROP.SIZE`` for an absolute crop, else the size the ViT is built for (``MODEL.VIT.IMG_SIZE``)."""
    if cfg.INPUT.CROP.ENABLED and cfg.INPUT.CROP.TYPE == "absolute":
        return tuple(cfg.INPUT.CROP.SIZE)
    return tuple(cfg.MODEL.VIT.IMG_SIZE)


def random_images(sizes: Sequence[Tuple[int, int]], seed: int = 0) -> List[torch.Tensor]:
    """uint8 ``[3, h, w]`` images of the given sizes, as the dataset mapper makes them."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in sizes]


class ModelBenchmark:
    """Builds one model per distinct set of config overrides (the ops implementation is switched per
    call, so variants differing only in it share a model) and times the scenarios."""

    def __init__(self, cfg, variant_list: Sequence[Variant], iters: int = 10, warmup: int = 2,
                 progress: Callable[[str], None] = None, memory: bool = True):
        """``memory``: measure each variant's peak memory in one more call after the timed ones."""
        if not variant_list:
            raise ValueError("no variant to benchmark")
        self.cfg = cfg
        self.variants = list(variant_list)
        self.iters, self.warmup = iters, warmup
        self.device = torch.device(cfg.MODEL.DEVICE)
        self.progress = progress or (lambda line: None)
        self.memory = memory
        self._state = None  # weights every model starts from: those of the first one built

    def config_with(self, overrides: Tuple[Tuple[str, str], ...]):
        cfg = self.cfg.clone()
        cfg.defrost()
        cfg.merge_from_list([item for pair in overrides for item in pair])
        cfg.freeze()
        return cfg

    def _build(self, cfg) -> torch.nn.Module:
        model = build_model(cfg)
        if self._state is None:
            self._state = copy.deepcopy(model.state_dict())
        else:
            model.load_state_dict(self._state)  # same keys, compiled or not
        return model

    # ----------------------------------------------------------------- scenarios
    def train_calls(self, batch_size: int) -> Dict[Variant, Callable[[], None]]:
        """One training iteration per call, for each variant."""
        h, w = training_crop_size(self.cfg)
        num_classes = self.cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        generator = torch.Generator().manual_seed(0)
        batch = [{"image": image, "sem_seg": torch.randint(0, num_classes, (h, w), generator=generator)}
                 for image in random_images([(h, w)] * batch_size)]
        steppers = {}
        for overrides in dict.fromkeys(v.overrides for v in self.variants):
            cfg = self.config_with(overrides)
            model = self._build(cfg).train()
            steppers[overrides] = Trainer.build_step_trainer(cfg, model, itertools.repeat(batch),
                                                             build_optimizer(cfg, model))

        def call(variant):
            def run():
                with ops.forced_pytorch(OPS_IMPLEMENTATIONS[variant.ops]), EventStorage():
                    steppers[variant.overrides].run_step()
            return run

        return {v: call(v) for v in self.variants}

    def inference_calls(self, images: Sequence[torch.Tensor], multi_scale_flip: bool) -> Dict[Variant, Callable]:
        """The evaluation of ``images`` (one at a time) per call, for each variant."""
        inputs = [[{"image": image, "height": image.shape[-2], "width": image.shape[-1]}] for image in images]
        models = {}
        for overrides in dict.fromkeys(v.overrides for v in self.variants):
            cfg = self.config_with(overrides)
            model = self._build(cfg).eval()
            models[overrides] = (SemanticSegmentorWithTTA(cfg, model) if multi_scale_flip
                                 else SemanticSegmentorWithTTA(cfg, model, ratios=[1.0], flip=False))

        def call(variant):
            def run():
                with ops.forced_pytorch(OPS_IMPLEMENTATIONS[variant.ops]), torch.no_grad():
                    for one in inputs:
                        models[variant.overrides](one)
            return run

        return {v: call(v) for v in self.variants}

    # -------------------------------------------------------------------- timing
    def measure(self, scenario: str, calls: Dict[Variant, Callable[[], None]], images_per_call: int) -> List[Row]:
        names = {v.name: fn for v, fn in calls.items()}
        self.progress(f"{scenario}: {len(names)} variant(s), {self.warmup} warm-up round(s) (torch.compile "
                      f"compiles here), then {self.iters} timed round(s)")

        def on_round(timed: bool, i: int, times: Dict[str, CallTimes]):
            if not timed:
                seconds = ", ".join(f"{n} {t.warmup_s:.3g}s" for n, t in times.items())
                self.progress(f"{scenario}: warm-up round {i + 1}/{self.warmup} done: {seconds} so far")
                return
            medians = ", ".join(f"{n} {statistics.median(t.wall):.3g}s" for n, t in times.items())
            self.progress(f"{scenario}: round {i + 1}/{self.iters}: median {medians}")

        times = interleaved_times(names, self.device, self.iters, self.warmup, on_round)
        rows = []
        base = next(iter(times.values()))
        for name, t in times.items():
            quartiles = statistics.quantiles(t.wall, n=4) if len(t.wall) > 1 else [t.wall[0]] * 3
            median = statistics.median(t.wall)
            memory = None
            if self.memory and self.device.type == "cuda":
                memory = peak_memory_bytes(names[name], self.device)
            elif self.memory:
                memory = peak_rss_bytes(names[name])
            rows.append(Row(
                scenario, name, device_label(self.device), images_per_call, median, quartiles[0], quartiles[2],
                statistics.median(t.cpu), images_per_call / median, statistics.median(base.wall) / median,
                statistics.median(base.cpu) / statistics.median(t.cpu),
                None if memory is None else memory / 2 ** 20, t.warmup_s, self.iters))
        return rows

    def run(self, modes: Sequence[str], batch_size: int, image_sizes: Sequence[Tuple[int, int]],
            inference_scenarios: Sequence[str]) -> List[Row]:
        """``modes`` among "train", "infer"; ``inference_scenarios`` among :data:`INFERENCE_SCENARIOS`."""
        rows = []
        if "train" in modes:
            rows += self.measure(f"train (batch {batch_size})", self.train_calls(batch_size), batch_size)
        if "infer" in modes:
            images = random_images(image_sizes)
            sizes = " ".join(f"{h}x{w}" for h, w in image_sizes)
            for scenario in inference_scenarios:
                calls = self.inference_calls(images, INFERENCE_SCENARIOS[scenario])
                rows += self.measure(f"infer {self.cfg.TEST.MODE} {scenario} ({sizes})", calls, len(images))
        return rows


def markdown_table(rows: Sequence[Row]) -> str:
    """The rows as a markdown table (CPU time and its ratio only on CPU)."""
    cpu = bool(rows) and rows[0].device.startswith("CPU")
    head = ["scenario", "variant", "median s/call", "IQR (s)", "vs first"]
    head += ["CPU s/call", "vs first (CPU time)"] if cpu else []
    head += ["images/s", "peak RSS (MiB)" if cpu else "peak mem (MiB)", "warm-up (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.scenario, r.variant, f"{r.median_s:.4g}", f"{r.p25_s:.4g}-{r.p75_s:.4g}", f"{r.speedup:.2f}x"]
        cells += [f"{r.cpu_median_s:.4g}", f"{r.cpu_speedup:.2f}x"] if cpu else []
        cells += [f"{r.images_per_s:.3g}", "n/a" if r.peak_mem_mib is None else f"{r.peak_mem_mib:.0f}",
                  f"{r.warmup_s:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_metadata(argv: Sequence[str], device: torch.device) -> Dict:
    """Device, date, command line, threads and load average: what a recorded figure needs beside it."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"device": device_label(device), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join([os.path.basename(sys.executable)] + list(argv)), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "ops": ops.active_implementation(device),
            "load_average_1_5_15min": load}
