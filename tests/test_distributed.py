"""Training and evaluation in 2 CPU processes (gloo) against 1 process: gradient averaging, sharding,
rank-0-only files, resume, failure handling, and tools/train_net.py under --num-gpus 2 and torchrun.

The spawned processes run this module's ``_worker_*`` functions (picklable by name: spawn gives the
children the parent's sys.path, which holds tests/)."""
import argparse
import atexit
import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.distributed as dist

import structtoken_d2  # noqa: F401
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from structtoken_d2 import add_structtoken_config
from structtoken_d2.data.datasets import shapes
from structtoken_d2.engine import ProcessFailedError, Trainer, launch, setup_process
from structtoken_d2.engine.launch import SHUTDOWN_GRACE_S, free_local_port
from structtoken_d2.evaluation import SemSegEvaluator
from structtoken_d2.modeling.checkpoint import StructTokenCheckpointer

REPO = Path(__file__).resolve().parents[1]
SHAPES_CONFIG = REPO / "configs/synthetic/structtoken_shapes.yaml"
#: A 1-block, 32-channel model on 32 x 32 images, no random augmentation (resize ratio 1, no crop,
#: flip or photometric distortion), a global batch of 4, evaluation only after training, in float32 (the
#: main job's bfloat16 autocast rounds 1 and 2 processes' steps apart by far more than the tolerances here).
TINY = [
    "MODEL.DEVICE", "cpu", "MODEL.VIT.EMBED_DIM", "32", "MODEL.VIT.DEPTH", "1", "MODEL.VIT.NUM_HEADS", "2",
    "MODEL.VIT.IMG_SIZE", "[32, 32]", "MODEL.STRUCTTOKEN.NUM_BLOCKS", "1", "MODEL.STRUCTTOKEN.TOKEN_SIZE", "[2, 2]",
    "INPUT.CROP.ENABLED", "False", "INPUT.RESIZE_SCALE", "[32, 32]", "INPUT.RESIZE_RATIO_RANGE", "[1.0, 1.0]",
    "INPUT.RANDOM_FLIP", "none", "INPUT.PHOTOMETRIC_DISTORTION", "False", "SOLVER.IMS_PER_BATCH", "4",
    "SOLVER.WARMUP_ITERS", "2", "SOLVER.CHECKPOINT_PERIOD", "1000", "TEST.AUG.ENABLED", "False",
    "TEST.SCALE", "[32, 32]", "TEST.SLIDE_CROP_SIZE", "[32, 32]", "TEST.SLIDE_STRIDE", "[21, 21]",
    "TEST.EVAL_PERIOD", "0", "TEST.PREDICTION_IMAGES", "2", "DATALOADER.NUM_WORKERS", "0", "SOLVER.AMP.ENABLED", "False",
]
#: SGD without gradient clipping: its update is proportional to the gradient, so a sum instead of
#: an average over processes (or a wrong share of the batch) changes the result (AdamW would not see
#: a factor 2).
SGD = ["SOLVER.OPTIMIZER", "SGD", "SOLVER.BASE_LR", "0.05", "SOLVER.CLIP_GRADIENTS.ENABLED", "False"]
#: Images per split of the small shapes set used by in-process and spawned runs (val: 5, uneven
#: over 2 processes).
SMALL_SPLITS = {"train": (8, 0), "val": (5, 1)}
#: Images per split that tools/train_net.py (not patched) loads.
REGISTERED_SPLITS = dict(shapes.SHAPES_SPLITS)


def _cfg(output_dir, opts=()):
    cfg = get_cfg()
    add_structtoken_config(cfg)
    cfg.merge_from_file(str(SHAPES_CONFIG))
    cfg.merge_from_list(TINY + list(opts) + ["OUTPUT_DIR", str(output_dir)])
    return cfg


def _launch_2(worker, *args, timeout_min=1.0):
    """``worker(*args)`` in 2 CPU processes through structtoken_d2's launch."""
    launch(worker, 2, dist_url=f"tcp://127.0.0.1:{free_local_port()}", args=args, timeout=timedelta(minutes=timeout_min))


class _WriteAudit:
    """Records every file this process opens for writing, creates, renames or removes under
    ``folder`` (Python audit events; cv2.imwrite's C++ writes are not seen)."""

    EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.replace", "shutil.rmtree"}

    def __init__(self, folder: str):
        self.folder, self.seen, self.active = os.path.abspath(folder), [], True
        sys.addaudithook(self)

    def __call__(self, event, args):
        if not self.active or (event != "open" and event not in self.EVENTS) or not args:
            return
        if event == "open" and not _writes(args):
            return
        paths = args[:2] if event in ("os.rename", "os.replace") else args[:1]  # (source, destination)
        paths = [p for p in paths if isinstance(p, (str, os.PathLike))]
        if any(os.path.abspath(p).startswith(self.folder) for p in paths):
            self.seen.append(" ".join([event] + [os.path.relpath(p, self.folder) for p in paths]))


def _writes(open_args) -> bool:
    mode, flags = open_args[1], open_args[2]
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))


def _worker_train_and_evaluate(out_dir, results_dir, reference_checkpoint):
    """Trains 3 iterations (config of :func:`_cfg` + SGD), then evaluates ``reference_checkpoint``;
    rank 0 saves the results, each rank its audit of the files it wrote."""
    shapes.SHAPES_SPLITS = SMALL_SPLITS
    audit = _WriteAudit(out_dir)
    cfg = _cfg(out_dir, SGD + ["SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "1"])
    setup_process(cfg, argparse.Namespace(config_file=str(SHAPES_CONFIG), eval_only=False))
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    model = Trainer.build_model(cfg)
    StructTokenCheckpointer(model).load(reference_checkpoint)
    metrics = Trainer.test(cfg, model)
    summed = _evaluate_one_image_per_rank()
    audit.active = False
    rank = comm.get_rank()
    Path(results_dir, f"writes_rank{rank}.json").write_text(json.dumps(audit.seen))
    if rank == 0:
        Path(results_dir, "metrics.json").write_text(json.dumps({"checkpoint": metrics, "summed": summed}))


def _evaluate_one_image_per_rank():
    """SemSegEvaluator over 2 processes: rank r is given val image r predicted as class r + 1 everywhere."""
    evaluator = SemSegEvaluator("shapes_sem_seg_val", distributed=True)
    evaluator.reset()
    rank = comm.get_rank()
    record = DatasetCatalog.get("shapes_sem_seg_val")[rank]
    scores = torch.zeros(6, 128, 128)
    scores[rank + 1] = 1.0
    evaluator.process([record], [{"sem_seg": scores}])
    return evaluator.evaluate().get("sem_seg")


@pytest.fixture(scope="module")
def small_shapes(tmp_path_factory):
    """The small shapes set, generated once, in force here (the workers set SMALL_SPLITS themselves)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DETECTRON2_DATASETS", str(tmp_path_factory.mktemp("datasets")))
        mp.setattr(shapes, "SHAPES_SPLITS", SMALL_SPLITS)
        shapes.ensure_shapes_generated()
        yield


@pytest.fixture(scope="module")
def one_and_two_processes(small_shapes, tmp_path_factory):
    """The same 3-iteration training in 1 process (here) and in 2 processes, the latter then
    evaluating the former's final checkpoint."""
    tmp = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the 2 processes on this machine's 2 cores
    try:
        seed_all_rng(0)  # the config's SEED, as setup_process gives rank 0
        single = Trainer(_cfg(tmp / "one", SGD + ["SOLVER.MAX_ITER", "3"]))
        initial = {k: v.clone() for k, v in single.model.state_dict().items()}
        single.resume_or_load(resume=False)
        single.train()
        single_metrics = Trainer.test(single.cfg, single.model)
    finally:
        torch.set_num_threads(threads)
    results = tmp / "results"
    results.mkdir()
    _launch_2(_worker_train_and_evaluate, str(tmp / "two"), str(results), str(tmp / "one" / "model_final.pth"))
    return dict(tmp=tmp, initial=initial, single_metrics=single_metrics, results=results)


def _final_model(run_dir):
    return torch.load(run_dir / "model_final.pth", map_location="cpu", weights_only=False)["model"]


def test_two_processes_train_to_the_same_parameters_as_one(one_and_two_processes):
    run = one_and_two_processes
    one, two = _final_model(run["tmp"] / "one"), _final_model(run["tmp"] / "two")
    assert one.keys() == two.keys()
    moved = max((one[k] - run["initial"][k]).abs().max().item() for k in one)
    assert moved > 1e-3  # training changed the parameters well beyond the tolerance below
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6, msg=key)


def test_two_process_evaluation_gives_the_single_process_metrics_exactly(one_and_two_processes):
    run = one_and_two_processes
    two = json.loads((run["results"] / "metrics.json").read_text())["checkpoint"]
    assert "mIoU" in two["sem_seg"]
    # every metric, to the last bit (as JSON text, so that NaN IoUs of absent classes compare equal)
    assert json.dumps(two, sort_keys=True) == json.dumps(run["single_metrics"], sort_keys=True)


def test_evaluator_sums_the_confusion_matrices_of_all_processes(one_and_two_processes):
    summed = json.loads((one_and_two_processes["results"] / "metrics.json").read_text())["summed"]
    records = DatasetCatalog.get("shapes_sem_seg_val")
    conf = np.zeros((6, 6), np.float64)
    for rank in (0, 1):  # image `rank` predicted as class rank + 1, by hand
        gt = cv2.imread(records[rank]["sem_seg_file_name"], cv2.IMREAD_UNCHANGED).astype(np.int64)
        for k in np.unique(gt[gt != 255]):
            conf[k, rank + 1] += (gt == k).sum()
    tp = np.diag(conf)
    assert summed["pACC"] == pytest.approx(100 * tp.sum() / conf.sum())
    with np.errstate(invalid="ignore"):
        iou = tp / (conf.sum(0) + conf.sum(1) - tp)  # NaN for the classes in neither
    assert summed["mIoU"] == pytest.approx(100 * np.nanmean(iou))


def test_only_rank_0_writes_files(one_and_two_processes):
    results = one_and_two_processes["results"]
    rank0 = json.loads((results / "writes_rank0.json").read_text())
    rank1 = json.loads((results / "writes_rank1.json").read_text())
    assert rank1 == []
    for name in ("log.txt", "config.yaml", "metrics.json", "last_checkpoint", "model_final.pth"):
        assert any(name in w for w in rank0), name  # the audit sees the writes
    out = one_and_two_processes["tmp"] / "two"
    assert not list(out.rglob("*.rank*"))
    predictions = out / "inference" / "predictions" / "shapes_sem_seg_val"
    assert sorted(p.name for p in predictions.iterdir()) == ["00000.png", "00001.png"]  # not rank 1's 00003...


def _worker_report_ranks(results_dir):
    ranks = dict(rank=comm.get_rank(), world_size=comm.get_world_size(), local_rank=comm.get_local_rank(),
                 local_size=comm.get_local_size(), gathered=comm.all_gather(comm.get_rank()))
    Path(results_dir, f"rank{ranks['rank']}.json").write_text(json.dumps(ranks))


def test_two_machines_of_one_process_each_get_global_and_local_ranks(tmp_path):
    """--num-machines 2 on localhost: machine 1 in a subprocess, machine 0 here."""
    url = f"tcp://127.0.0.1:{free_local_port()}"
    machine_1 = subprocess.Popen(
        [sys.executable, "-c", "import sys; from datetime import timedelta; sys.path.insert(0, 'tests'); "
         "import test_distributed as t; t.launch(t._worker_report_ranks, 1, num_machines=2, machine_rank=1, "
         f"dist_url={url!r}, args=({str(tmp_path)!r},), timeout=timedelta(minutes=1))"],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        launch(_worker_report_ranks, 1, num_machines=2, machine_rank=0, dist_url=url, args=(str(tmp_path),),
               timeout=timedelta(minutes=1))
    finally:
        returncode = machine_1.wait(timeout=90)  # it times out within a minute if this machine failed
    assert returncode == 0
    for rank in (0, 1):
        ranks = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert ranks == dict(rank=rank, world_size=2, local_rank=0, local_size=1, gathered=[0, 1])


def _worker_gathers_then_reports_groups_at_exit(results_dir):
    """Gathers through ``comm`` (whose ``_get_global_gloo_group`` caches a group), then, at interpreter
    exit (after the launcher ended the job), records what still holds a process group."""
    comm.all_gather(comm.get_rank())
    rank = comm.get_rank()

    def report():
        state = dict(initialized=dist.is_initialized(), local=comm._LOCAL_PROCESS_GROUP is not None,
                     cached=comm._get_global_gloo_group.cache_info().currsize)
        Path(results_dir, f"exit_rank{rank}.json").write_text(json.dumps(state))

    atexit.register(report)


def test_no_process_group_outlives_the_job(tmp_path):
    """A group still referenced at exit is destroyed during the interpreter's finalization, where gloo
    can abort a process that succeeded ("terminate called without an active exception", seen once in
    CI); the launcher lets go of every group, Detectron2's cached one included, before the exit."""
    _launch_2(_worker_gathers_then_reports_groups_at_exit, str(tmp_path))
    for rank in (0, 1):
        state = json.loads((tmp_path / f"exit_rank{rank}.json").read_text())
        assert state == dict(initialized=False, local=False, cached=0), (rank, state)


# ---------------------------------------------------------------------------------- failures
class _FailAt(HookBase):
    """Before iteration ``iteration``, every rank lists its process tree in ``pid_dir``; then rank
    ``rank`` raises (``how`` "raise"), kills itself (SIGKILL, "kill") or hangs ("hang")."""

    def __init__(self, rank, iteration, how, pid_dir):
        self.rank, self.iteration, self.how, self.pid_dir = rank, iteration, how, Path(pid_dir)

    def before_step(self):
        if self.trainer.iter != self.iteration:
            return
        pids = _process_tree(os.getpid())
        (self.pid_dir / f"pids_rank{comm.get_rank()}.json").write_text(json.dumps(pids))
        comm.synchronize()
        if comm.get_rank() == self.rank:
            (self.pid_dir / "failed_at").write_text(str(time.time()))
            if self.how == "raise":
                raise RuntimeError(f"injected failure at iteration {self.iteration}")
            if self.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(3600)


def _process_tree(root: int):
    """``root`` and its descendants' pids, from /proc."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" ", 1)
        except OSError:
            continue
        ppid = int(rest.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(pid))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _worker_fail(out_dir, pid_dir, rank, iteration, how):
    shapes.SHAPES_SPLITS = SMALL_SPLITS
    cfg = _cfg(out_dir, ["SOLVER.MAX_ITER", "10", "SOLVER.CHECKPOINT_PERIOD", "2", "DATALOADER.NUM_WORKERS", "1"])
    setup_process(cfg, argparse.Namespace(config_file="", eval_only=False))
    trainer = Trainer(cfg)
    trainer.register_hooks([_FailAt(rank, iteration, how, pid_dir)])
    trainer.resume_or_load(resume=False)
    trainer.train()


#: Collective timeout of the failure tests, in seconds.
TIMEOUT_S = 12


@pytest.mark.parametrize("how, rank, named, cause", [
    ("raise", 1, 1, "injected failure at iteration 5"),
    ("kill", 0, 0, "killed by SIGKILL"),
    ("hang", 1, 0, "Timed out"),  # the waiting rank times out: it is the one that fails
])
def test_a_failing_rank_stops_the_job_naming_it_and_leaves_no_process(small_shapes, tmp_path, how, rank, named, cause):
    out = tmp_path / "run"
    with pytest.raises(ProcessFailedError) as failure:
        _launch_2(_worker_fail, str(out), str(tmp_path), rank, 5, how, timeout_min=TIMEOUT_S / 60)
    stopped = time.time()
    assert failure.value.rank == named and f"rank {named} of 2 failed" in str(failure.value)
    assert cause in str(failure.value)
    # the launcher stops the others within two grace periods (then SIGTERM, then SIGKILL), once
    # a process failed: at once, or after the collective timeout when one hangs
    waited = TIMEOUT_S if how == "hang" else 0
    assert stopped - float((tmp_path / "failed_at").read_text()) < waited + 2 * SHUTDOWN_GRACE_S + 5
    pids = [pid for r in (0, 1) for pid in json.loads((tmp_path / f"pids_rank{r}.json").read_text())]
    assert len(pids) >= 4  # 2 ranks and their data-loader workers
    deadline = time.time() + 15  # orphaned data-loader workers check their parent every 5 s
    while any(_running(p) for p in pids) and time.time() < deadline:
        time.sleep(0.2)
    assert not [p for p in pids if _running(p)]
    # iterations 0..4 ran: checkpoints after iterations 1 and 3, each complete
    assert (out / "last_checkpoint").read_text().strip() == "model_0000003.pth"
    for path in out.glob("*.pth"):
        assert torch.load(path, map_location="cpu", weights_only=False)["iteration"] in (1, 3), path


# ------------------------------------------------------------------------- tools/train_net.py
@pytest.fixture(scope="module")
def full_size_shapes(tmp_path_factory):
    """DETECTRON2_DATASETS holding a shapes set of the registered size (2000 + 200 records), each
    image a link to one of 8 rendered samples: what an unpatched tools/train_net.py loads."""
    root = tmp_path_factory.mktemp("full_size_datasets")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DETECTRON2_DATASETS", str(root))
        target = shapes.shapes_root()
        mp.setenv("DETECTRON2_DATASETS", str(root / "samples"))
        mp.setattr(shapes, "SHAPES_SPLITS", {"train": (8, 0), "val": (8, 1)})
        samples = shapes.ensure_shapes_generated()
    for split, (count, _seed) in REGISTERED_SPLITS.items():
        for kind in ("images", "labels"):
            folder = target / split / kind
            folder.mkdir(parents=True)
            for i in range(count):
                (folder / f"{i:05d}.png").symlink_to(samples / split / kind / f"{i % 8:05d}.png")
    return str(root)


def _train_net(command, datasets, timeout=240):
    env = dict(os.environ, DETECTRON2_DATASETS=datasets, OMP_NUM_THREADS="1")
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_train_net_under_torchrun_then_resumed_with_num_gpus_2(full_size_shapes, tmp_path):
    """2 iterations started by torchrun (2 processes, no second spawn), continued to 4 by
    ``--num-gpus 2 --resume`` (2 CPU processes started by tools/train_net.py itself)."""
    out = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                "127.0.0.1", "--master_port", str(free_local_port()), "tools/train_net.py"]
    first = _train_net(torchrun + ["--config-file", str(SHAPES_CONFIG)] + TINY
                       + ["SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(out)], full_size_shapes)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Started by torchrun: 2 processes (gloo backend)" in first.stderr
    assert "starting 2 CPU processes" not in first.stderr  # no second spawn
    assert "World size: 2" in (out / "log.txt").read_text()
    assert torch.load(out / "model_final.pth", weights_only=False)["iteration"] == 1

    resumed = _train_net([sys.executable, "tools/train_net.py", "--config-file", str(SHAPES_CONFIG), "--num-gpus", "2",
                          "--dist-timeout", "1", "--dist-url", f"tcp://127.0.0.1:{free_local_port()}", "--resume"]
                         + TINY + ["SOLVER.MAX_ITER", "4", "OUTPUT_DIR", str(out)], full_size_shapes)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "starting 2 CPU processes (gloo backend" in resumed.stderr
    assert "Starting training from iteration 2" in (out / "log.txt").read_text()
    final = torch.load(out / "model_final.pth", weights_only=False)
    assert final["iteration"] == 3
    steps = {int(s["step"]) for s in final["trainer"]["step_trainer"]["optimizer"]["state"].values()}
    assert steps == {4}  # AdamW's state continued from the checkpoint: 2 + 2 steps
    assert not list(out.rglob("*.rank*"))
    predictions = out / "inference" / "predictions" / "shapes_sem_seg_val"
    assert sorted(p.name for p in predictions.iterdir()) == ["00000.png", "00001.png"]


def test_a_user_error_under_two_processes_is_one_line_naming_the_rank(tmp_path):
    """A missing folder dataset under ``--num-gpus 2``: a rank prints the one-line error with its rank,
    no traceback; the launcher names a failed rank and the job exits with status 1."""
    missing = tmp_path / "no_such_data"
    done = _train_net([sys.executable, "tools/train_net.py", "--config-file", str(SHAPES_CONFIG), "--num-gpus", "2",
                       "--dist-timeout", "1", "--dist-url", f"tcp://127.0.0.1:{free_local_port()}"]
                      + TINY + ["DATASETS.FOLDER.ROOT", str(missing), "DATASETS.FOLDER.CLASSES", "['a', 'b']",
                                "DATASETS.TRAIN", "('folder_train',)", "OUTPUT_DIR", str(tmp_path / "run")],
                      str(tmp_path))
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("train_net.py: error")]
    assert errors  # both ranks' lines, unless the launcher stopped the slower one first (after 5 s)
    for line in errors:
        assert re.match(r"train_net.py: error \(rank [01] of 2\): Dataset 'folder_<split>' not found: missing "
                        + re.escape(f"{missing}/images"), line), line
    assert "Traceback" not in done.stderr
    assert re.search(r"train_net.py: rank [01] of 2 failed \(exit code 1\)", done.stderr)
