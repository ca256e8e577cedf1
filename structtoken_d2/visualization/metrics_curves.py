"""Loss, learning-rate and mIoU curves from Detectron2's ``OUTPUT_DIR/metrics.json`` as one PNG."""
import json
import os
from typing import Dict, List

from matplotlib.figure import Figure

from ..output_files import replace_file

METRICS_FILE = "metrics.json"
CURVES_FILE = "curves.png"


def load_metrics(output_dir: str) -> List[Dict]:
    """The records of ``output_dir/metrics.json`` (one JSON object per line, with "iteration").

    Detectron2 appends to the file: a record whose iteration is not after the previous one starts
    a new run (a resume or a fresh start in the same folder), which replaces the earlier records
    from that iteration on. Raises FileNotFoundError naming the folder when there is no file."""
    path = os.path.join(output_dir, METRICS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{output_dir}: no {METRICS_FILE} in this folder; pass the OUTPUT_DIR of a training run "
            f"(Detectron2 writes {METRICS_FILE} there while training)"
        )
    with open(path) as f:
        lines = f.read().splitlines()
    records: List[Dict] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):  # a run killed while writing its last line
                break
            raise ValueError(f"{path}, line {number}: not JSON ({e})") from e
        if "iteration" not in record:
            continue
        if records and record["iteration"] <= records[-1]["iteration"]:
            records = [r for r in records if r["iteration"] < record["iteration"]]
        records.append(record)
    return records


def _series(records: List[Dict], key: str):
    points = [(r["iteration"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def _miou_labels(keys: List[str]) -> Dict[str, str]:
    """Legend labels of the mIoU keys: with one test dataset (``sem_seg/mIoU`` and
    ``<dataset>_TTA/sem_seg/mIoU``) "single-scale" and "multi-scale + flip"; else the keys."""
    tta = [k for k in keys if k.endswith("_TTA/sem_seg/mIoU")]
    if set(keys) - set(tta) <= {"sem_seg/mIoU"} and len(tta) <= 1:
        return {k: "multi-scale + flip" if k in tta else "single-scale" for k in keys}
    return {k: k for k in keys}


def metrics_figure(records: List[Dict], title: str = "") -> Figure:
    """Three panels: the losses (``total_loss`` and every ``loss_*``), ``lr``, and every
    ``.../mIoU`` that an evaluation logged (single-scale, ``_TTA`` multi-scale + flip), per iteration."""
    keys = sorted({k for r in records for k in r})
    fig = Figure(figsize=(13, 3.6), constrained_layout=True)
    loss_ax, lr_ax, miou_ax = fig.subplots(1, 3, sharex=True)
    loss_keys = [k for k in keys if k == "total_loss" or k.startswith("loss_")]
    for key in loss_keys:
        loss_ax.plot(*_series(records, key), label=key, linewidth=1)
    loss_ax.set_title("training loss")
    lr_ax.plot(*_series(records, "lr"), color="tab:green", linewidth=1)
    lr_ax.set_title("learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    miou_keys = [k for k in keys if k.endswith("mIoU")]
    labels = _miou_labels(miou_keys)
    for key in miou_keys:
        miou_ax.plot(*_series(records, key), marker="o", label=labels[key])
    miou_ax.set_title("mIoU (%)")
    if not miou_keys:
        miou_ax.text(0.5, 0.5, "no evaluation logged", ha="center", va="center", transform=miou_ax.transAxes)
    for ax, legend in ((loss_ax, len(loss_keys) > 1), (lr_ax, False), (miou_ax, bool(miou_keys))):
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if legend:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def plot_metrics(output_dir: str, path: str = "") -> str:
    """Writes the curves of ``output_dir/metrics.json`` to ``path`` (default
    ``output_dir/curves.png``, replaced atomically when it exists: the curves are regenerated
    whenever the run goes on). Returns the path written."""
    records = load_metrics(output_dir)
    fig = metrics_figure(records, title=os.path.normpath(output_dir))
    return replace_file(path or os.path.join(output_dir, CURVES_FILE), lambda tmp: fig.savefig(tmp, dpi=110))
