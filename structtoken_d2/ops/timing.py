"""Timing, peak memory and roofline of the device, for ``tools/benchmark_ops.py`` and
``tools/benchmark_model.py``.

CUDA: CUDA events around each call, the L2 cache flushed before each one (a write of twice its size),
median over the iterations; peak memory from the caching allocator. CPU: ``time.perf_counter``
median, no cache flush; peak memory as the process's peak resident set (:func:`peak_rss_bytes`).
"""
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

# Dense tensor-core peak TFLOP/s by (device-name substring, dtype); a device not listed reports no
# FLOP roofline unless --peak-tflops is given.
PEAK_TFLOPS = {
    ("H100", torch.bfloat16): 989.0, ("H100", torch.float16): 989.0, ("H100", torch.float32): 67.0,
    ("H200", torch.bfloat16): 989.0, ("H200", torch.float16): 989.0, ("H200", torch.float32): 67.0,
    ("A100", torch.bfloat16): 312.0, ("A100", torch.float16): 312.0, ("A100", torch.float32): 19.5,
}

# Peak memory bandwidth GB/s by device-name substring (first match wins), for when the driver reports no
# memory clock (CUDA 13 dropped it from cudaDeviceProp).
PEAK_GBPS = {"H200": 4800.0, "H100 PCIe": 2000.0, "H100 NVL": 3900.0, "H100": 3350.0, "A100-SXM4-80GB": 2039.0,
             "A100 80GB PCIe": 1935.0, "A100": 1555.0}


@dataclass
class Roofline:
    """Peak memory bandwidth (GB/s) and peak compute (TFLOP/s) of a device; None where unknown."""

    gbps: Optional[float]
    tflops: Optional[float]

    def seconds(self, bytes_moved: float, flops: float) -> Optional[float]:
        """Lower bound on the time of a kernel moving ``bytes_moved`` and doing ``flops``."""
        bounds = []
        if self.gbps and bytes_moved:
            bounds.append(bytes_moved / (self.gbps * 1e9))
        if self.tflops and flops:
            bounds.append(flops / (self.tflops * 1e12))
        return max(bounds) if bounds else None


def device_roofline(device: torch.device, dtype: torch.dtype, gbps: Optional[float] = None,
                    tflops: Optional[float] = None) -> Roofline:
    """The device's roofline; explicit ``gbps`` / ``tflops`` override what is derived here."""
    if device.type != "cuda":
        return Roofline(gbps, tflops)
    props = torch.cuda.get_device_properties(device)
    return Roofline(gbps or derived_gbps(props.name, getattr(props, "memory_clock_rate", 0),
                                             getattr(props, "memory_bus_width", 0)),
                    tflops or next((v for (name, dt), v in PEAK_TFLOPS.items() if name in props.name and dt == dtype),
                                   None))


def derived_gbps(name: str, memory_clock_khz: int, bus_width_bits: int) -> Optional[float]:
    """Peak bandwidth from the memory clock (double data rate) and bus width, else from ``PEAK_GBPS``."""
    if memory_clock_khz and bus_width_bits:
        return 2 * memory_clock_khz * 1e3 * bus_width_bits / 8 / 1e9
    return next((v for key, v in PEAK_GBPS.items() if key in name), None)


def median_seconds(fn: Callable[[], object], device: torch.device, iters: int, warmup: int) -> float:
    """Median wall time of ``fn()`` over ``iters`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    flush = torch.empty(2 * torch.cuda.get_device_properties(device).L2_cache_size, dtype=torch.uint8, device=device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return statistics.median(start.elapsed_time(end) for start, end in events) / 1e3


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak allocated memory of one ``fn()`` call above what was allocated before it; None on CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


@dataclass
class CallTimes:
    """Seconds of the timed calls of one callable: ``wall`` (what a user waits for; CUDA synchronised)
    and ``cpu`` (CPU time of the whole process, all threads), plus the untimed warm-up calls' total."""

    wall: List[float] = field(default_factory=list)
    cpu: List[float] = field(default_factory=list)
    warmup_s: float = 0.0


def interleaved_times(fns: Dict[str, Callable[[], object]], device: torch.device, iters: int, warmup: int,
                      on_round: Optional[Callable[[bool, int, Dict[str, CallTimes]], None]] = None
                      ) -> Dict[str, CallTimes]:
    """Times every ``fns[name]()`` ``iters`` times, round-robin (one call of each per round), after
    ``warmup`` untimed rounds, so that a load change on a shared machine hits every callable alike. Each
    timed round starts one callable later than the previous, so that none always runs first: with the
    same code on both sides, the one timed first in every round came out up to 6% slower (2 threads,
    2-core CPU, docs/benchmarks.md "The CPU path of the head").
    ``on_round(timed, round_index, times)`` is called after each round (progress)."""
    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - wall, time.process_time() - cpu

    times = {name: CallTimes() for name in fns}
    for i in range(warmup):
        for name, fn in fns.items():
            times[name].warmup_s += timed(fn)[0]
        if on_round is not None:
            on_round(False, i, times)
    names = list(fns)
    for i in range(iters):
        for name in names[i % len(names):] + names[:i % len(names)]:
            wall, cpu = timed(fns[name])
            times[name].wall.append(wall)
            times[name].cpu.append(cpu)
        if on_round is not None:
            on_round(True, i, times)
    return times


#: Linux: writing "5" to it resets the process's peak resident set (VmHWM) to its current one (kernel >= 4.0).
CLEAR_REFS = "/proc/self/clear_refs"


def _rss_bytes() -> Optional[int]:
    """Resident set size of this process (Linux ``/proc/self/statm``), None where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _kernel_peak_rss_bytes() -> Optional[int]:
    """The kernel's peak resident set size of this process (``VmHWM`` of ``/proc/self/status``), None
    where unavailable."""
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), None)
    except (OSError, ValueError, IndexError):
        return None


def _reset_kernel_peak_rss() -> bool:
    """Resets ``VmHWM`` to the current resident set size; False where the kernel refuses."""
    try:
        with open(CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes(fn: Callable[[], object], interval_s: float = 0.001) -> Optional[int]:
    """Largest resident set size of the process while ``fn()`` runs; None where the RSS cannot be read.

    Linux: the kernel's own high-water mark (``VmHWM``), reset through :data:`CLEAR_REFS` before the
    call, so no peak is missed however short. Where that is refused or missing: the RSS sampled every
    ``interval_s`` by a thread (PyTorch releases the GIL inside its ops), which can miss a peak shorter
    than ``interval_s``."""
    if _kernel_peak_rss_bytes() is not None and _reset_kernel_peak_rss():
        fn()
        return _kernel_peak_rss_bytes()
    peak = [_rss_bytes()]
    if peak[0] is None:
        return None
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes() or 0)
            done.wait(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], _rss_bytes() or 0)


def device_label(device: torch.device) -> str:
    """The device as benchmark tables name it: the GPU's name, or ``CPU (<N> threads)``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"
