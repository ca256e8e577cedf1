"""Starting the processes of a job: one per GPU (Detectron2's ``launch``, NCCL), N CPU processes
(``gloo``) where there is no GPU, or none when ``torchrun`` (or SLURM through it) started them.

Every process ends with ``detectron2.utils.comm`` ready: the global process group, the
per-machine group behind ``comm.get_local_rank()`` / ``get_local_size()``, and a barrier passed.
One collective timeout (``--dist-timeout``, minutes) bounds process-group set-up and every
collective: a process that waits longer on a dead or hung peer raises.

When a process fails (an exception, or killed), the launcher stops the others on its machine
(SIGTERM after :data:`SHUTDOWN_GRACE_S` seconds, SIGKILL after as many more) and raises
:class:`ProcessFailedError` naming the global rank that failed first. Processes on other machines
stop when their next collective fails, at the latest after the collective timeout.
"""
import argparse
import faulthandler
import functools
import logging
import multiprocessing
import os
import socket
import sys
from datetime import timedelta
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as detectron2_launch
from detectron2.utils import comm

#: Default collective timeout in minutes (Detectron2's ``DEFAULT_TIMEOUT``).
DEFAULT_TIMEOUT_MINUTES = 30.0
#: Seconds the other processes of a machine get to exit by themselves after one failed.
SHUTDOWN_GRACE_S = 5.0
#: Environment variables that torchrun (and ``srun ... torchrun``) sets in every process it starts.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

logger = logging.getLogger(__name__)


class ProcessFailedError(RuntimeError):
    """A process of a multi-process job failed; ``rank`` is its global rank."""

    def __init__(self, rank: int, world_size: int, cause: str):
        self.rank, self.world_size = rank, world_size
        super().__init__(
            f"rank {rank} of {world_size} failed ({cause}); the other processes of this machine were "
            f"stopped (the log above holds the errors of the ranks that raised)"
        )


def add_launch_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds ``--dist-timeout`` to Detectron2's ``default_argument_parser()``."""
    parser.add_argument(
        "--dist-timeout", type=float, default=DEFAULT_TIMEOUT_MINUTES, metavar="MINUTES",
        help="collective timeout in minutes: a process waiting longer on another (process-group set-up, "
        f"gradient all-reduce, evaluation gathering) raises and the job stops (default {DEFAULT_TIMEOUT_MINUTES:g})",
    )
    return parser


def started_by_torchrun() -> bool:
    """Whether torchrun set up this process's rank and rendezvous (see :data:`TORCHRUN_ENV`)."""
    return all(name in os.environ for name in TORCHRUN_ENV)


def launch(
    main_func: Callable,
    num_processes_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: Optional[str] = "auto",
    args: Sequence = (),
    timeout: timedelta = timedelta(minutes=DEFAULT_TIMEOUT_MINUTES),
):
    """Runs ``main_func(*args)`` in every process of the job; returns its result in a
    single-process job.

    Under torchrun the process joins the group described by its environment and the other
    arguments are not used. Otherwise ``num_processes_per_machine`` processes are started on this
    machine (``--num-gpus``): one per GPU with CUDA, else CPU processes on the gloo backend.
    ``dist_url``: ``tcp://HOST:PORT`` of machine 0, or "auto" (a free local port, one machine).
    Raises :class:`ProcessFailedError` when a process fails.
    """
    if started_by_torchrun():
        return _run_in_torchrun_process(main_func, args, timeout)
    world_size = num_processes_per_machine * num_machines
    if world_size == 1:
        return main_func(*args)
    first_failure = multiprocessing.get_context("spawn").Value("i", -1)
    recording_main = functools.partial(_record_first_failure, main_func, first_failure)
    try:
        if torch.cuda.is_available():
            detectron2_launch(recording_main, num_processes_per_machine, num_machines, machine_rank,
                              dist_url, args=tuple(args), timeout=timeout)
        else:
            _launch_cpu_processes(recording_main, num_processes_per_machine, num_machines, machine_rank,
                                  dist_url, tuple(args), timeout)
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        raise _failure(e, first_failure.value, num_processes_per_machine * machine_rank, world_size) from None


def _launch_cpu_processes(main_func, num_processes, num_machines, machine_rank, dist_url, args, timeout):
    if dist_url == "auto":
        if num_machines > 1:
            raise ValueError("--dist-url auto works on one machine only: give tcp://HOST:PORT of machine 0")
        dist_url = f"tcp://127.0.0.1:{free_local_port()}"
    threads = _threads_per_process(num_processes)
    print(
        f"No CUDA GPU: starting {num_processes} CPU processes (gloo backend, {threads} thread(s) each) "
        f"on machine {machine_rank} of {num_machines}",
        file=sys.stderr,
    )
    context = mp.start_processes(
        _cpu_worker,
        args=(main_func, num_processes, num_machines, machine_rank, dist_url, args, timeout, threads),
        nprocs=num_processes,
        join=False,
    )
    while not context.join(grace_period=SHUTDOWN_GRACE_S):
        pass


def free_local_port() -> int:
    """A TCP port of 127.0.0.1 that is free now (the system picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _threads_per_process(num_processes: int) -> int:
    """Intra-op threads of each CPU process: OMP_NUM_THREADS when set, else this machine's usable
    cores shared out (as torchrun does, N processes would otherwise oversubscribe them)."""
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    return max(1, len(os.sched_getaffinity(0)) // num_processes)


def _cpu_worker(local_rank, main_func, num_processes, num_machines, machine_rank, dist_url, args, timeout, threads):
    faulthandler.enable()  # a process killed by a signal (SIGABRT, SIGSEGV) prints its Python stack
    torch.set_num_threads(threads)
    # Data-loader workers are forked from this process, as in a single-process run: spawned ones (what
    # this spawned process would otherwise use) re-import everything before they unpickle the dataset,
    # i.e. detectron2 before structtoken_d2's compat shims, unless __main__ imports structtoken_d2.
    multiprocessing.set_start_method("fork", force=True)
    rank = machine_rank * num_processes + local_rank
    try:
        dist.init_process_group("gloo", init_method=dist_url, world_size=num_processes * num_machines,
                                rank=rank, timeout=timeout)
    except Exception:
        logger.error("Rank %d could not join the process group at %s", rank, dist_url)
        raise
    _finish_group_setup(num_processes)
    main_func(*args)
    _end_group()


def _run_in_torchrun_process(main_func, args, timeout):
    from torch.distributed.elastic.multiprocessing.errors import record

    local_rank, local_size = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if os.environ["RANK"] == "0":
        print(f"Started by torchrun: {os.environ['WORLD_SIZE']} processes ({backend} backend); --num-gpus, "
              f"--num-machines, --machine-rank and --dist-url are not used", file=sys.stderr)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, init_method="env://", timeout=timeout)
    _finish_group_setup(local_size)
    result = record(functools.partial(_record_first_failure, main_func, None))(*args)
    _end_group()
    return result


def _finish_group_setup(num_processes_per_machine: int) -> None:
    """The per-machine process group of ``detectron2.utils.comm``, then a barrier (as Detectron2's
    launch). Machines hold consecutive ranks, ``num_processes_per_machine`` each."""
    world_size, rank = dist.get_world_size(), dist.get_rank()
    if world_size % num_processes_per_machine:
        raise ValueError(f"{world_size} processes cannot be split into machines of {num_processes_per_machine}")
    for first in range(0, world_size, num_processes_per_machine):
        group = dist.new_group(list(range(first, first + num_processes_per_machine)))
        if first <= rank < first + num_processes_per_machine:
            comm._LOCAL_PROCESS_GROUP = group
    comm.synchronize()


def _end_group() -> None:
    """After ``main_func`` returned in every process: a barrier, so that no process closes its
    connections while another still works (its last files, say), then every process group destroyed
    while the interpreter is whole.

    ``destroy_process_group`` unregisters the groups; each is destroyed when its last reference goes.
    ``comm`` keeps two: its per-machine group and, cached by ``comm._get_global_gloo_group`` on the
    first ``comm.all_gather`` / ``gather`` (the evaluation's), the gloo group. Kept, that one was
    destroyed during the interpreter's finalization, where gloo's threads can abort the process
    ("terminate called without an active exception") after the job succeeded."""
    comm.synchronize()
    comm._LOCAL_PROCESS_GROUP = None
    comm._get_global_gloo_group.cache_clear()
    dist.destroy_process_group()


def _record_first_failure(main_func, first_failure, *args):
    """``main_func(*args)``; when it raises, or exits with a non-zero status (a tool's one-line user
    error, :func:`~structtoken_d2.engine.user_errors.exit_on_user_error`), stores this process's rank in
    the shared ``first_failure`` unless another process failed before; an exception is logged with
    the rank and its traceback."""
    try:
        return main_func(*args)
    except BaseException as e:
        if isinstance(e, SystemExit) and e.code in (None, 0):
            raise
        rank = comm.get_rank()
        if first_failure is not None:
            with first_failure.get_lock():
                if first_failure.value < 0:
                    first_failure.value = rank
        if not isinstance(e, SystemExit):  # an exit printed its message
            logger.error("Rank %d of %d failed:", rank, comm.get_world_size(), exc_info=True)
        raise


def _failure(error: Exception, first_failure: int, first_rank: int, world_size: int) -> ProcessFailedError:
    """The :class:`ProcessFailedError` for ``error``, torch.multiprocessing's ProcessRaisedException or
    ProcessExitedException, of the processes of ranks ``first_rank``, ...: the process that
    was killed or exited non-zero; among processes that raised, the first one (the others raised
    because it left their collectives)."""
    if isinstance(error, mp.ProcessExitedException):
        cause = f"killed by {error.signal_name}" if error.signal_name else f"exit code {error.exit_code}"
        return ProcessFailedError(first_rank + error.error_index, world_size, cause)
    if first_failure < 0 or first_failure == first_rank + error.error_index:
        last_line = [line for line in str(error).splitlines() if line.strip()][-1].strip()
        return ProcessFailedError(first_rank + error.error_index, world_size, f"raised {last_line}")
    return ProcessFailedError(first_failure, world_size, "raised an exception")
