"""How much each class's token map lies on, and marks out, that class's ground-truth region, per stage.

For a class k present in an image's ground truth and a map M (one stage's slice k, at image
size), the *inside fraction* is ``sum(max(M, 0) * [gt == k]) / sum(max(M, 0))`` over the labelled
pixels (ignore pixels left out): the share of the map's positive mass on the class's region.
A map spread evenly scores the region's *area fraction*; a map all on the region scores 1.

The *centred* variant first subtracts from M its mean over the labelled pixels, so that it does
not depend on the map's offset: a map all negative but least negative on the region scores
high, where the plain measure scores it 0 (or NaN when it has no positive value at all).

The *separation* is the area under the ROC curve of M as a detector of the region: the chance that
a random pixel of the region has a higher value than a random labelled pixel outside it (ties count
half; the Mann-Whitney U statistic over ``n_in * n_out``). It depends only on the order of the
values, not on the map's offset, scale or the size of a spike: 0.5 for a map that does not tell the
region apart, 1 for one higher on every region pixel than anywhere else, 0 for the reverse.
"""
import csv
import functools
import json
import math
from typing import Callable, Dict, List, Sequence

import torch
from scipy.stats import rankdata
from tabulate import tabulate

from ..evaluation.per_class_table import nan_to_null
from ..output_files import save_new_file


def inside_fractions(maps: torch.Tensor, gt: torch.Tensor, ignore_label: int, centred: bool = False) -> torch.Tensor:
    """``maps [S, K, H, W]``, ``gt [H, W]`` -> ``[S, K]`` float64 inside fractions (``centred``:
    of the maps minus their mean over the labelled pixels); NaN for a class absent from ``gt``
    or a map without positive mass on the labelled pixels."""
    s, k = maps.shape[:2]
    valid = gt != ignore_label
    values = maps.double()[:, :, valid]  # [S, K, N]
    if centred:
        values = values - values.mean(-1, keepdim=True)
    positive = values.clamp(min=0)
    labels = gt[valid].long()
    on_class = torch.nn.functional.one_hot(labels, k).T.double()  # [K, N]
    inside = (positive * on_class).sum(-1)
    total = positive.sum(-1)
    fractions = inside / total
    present = on_class.sum(-1) > 0
    fractions[:, ~present] = math.nan
    fractions[total == 0] = math.nan
    return fractions


def region_separation(maps: torch.Tensor, gt: torch.Tensor, ignore_label: int) -> torch.Tensor:
    """``maps [S, K, H, W]``, ``gt [H, W]`` -> ``[S, K]`` float64 separations (ROC AUC of each map
    for its class's region, over the labelled pixels); NaN for a class absent from ``gt`` or
    covering all its labelled pixels."""
    s, k = maps.shape[:2]
    valid = gt != ignore_label
    values = maps.double()[:, :, valid].reshape(s * k, -1)  # [S*K, N]
    ranks = torch.from_numpy(rankdata(values.numpy(), axis=-1)).view(s, k, -1)  # 1..N, ties averaged
    on_class = torch.nn.functional.one_hot(gt[valid].long(), k).T.double()  # [K, N]
    n_in = on_class.sum(-1)
    n_out = on_class.shape[-1] - n_in
    rank_sum = (ranks * on_class).sum(-1)  # [S, K]
    auc = (rank_sum - n_in * (n_in + 1) / 2) / (n_in * n_out)
    auc[:, (n_in == 0) | (n_out == 0)] = math.nan
    return auc


#: The measures, by the name the tool's tables and files give them: ``(maps [S, K, H, W], gt [H, W],
#: ignore_label) -> [S, K]``, NaN where a class does not count.
MEASURES: Dict[str, Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]] = {
    "positive mass": inside_fractions,
    "centred": functools.partial(inside_fractions, centred=True),
    "separation": region_separation,
}


def area_fractions(gt: torch.Tensor, num_classes: int, ignore_label: int) -> torch.Tensor:
    """``[K]`` float64: each class's share of the labelled pixels; NaN for an absent class."""
    labels = gt[gt != ignore_label].long()
    counts = torch.bincount(labels, minlength=num_classes).double()
    area = counts / max(labels.numel(), 1)
    area[counts == 0] = math.nan
    return area


class ConcentrationMeter:
    """Averages one of the :data:`MEASURES` (by name) over images, per stage and class (mean over the
    images that contain the class, NaN entries skipped), beside the mean area fraction."""

    def __init__(self, stage_names: Sequence[str], class_names: Sequence[str], ignore_label: int,
                 measure: str = "positive mass"):
        self.stage_names = list(stage_names)
        self.class_names = list(class_names)
        self.ignore_label = ignore_label
        self.measure = MEASURES[measure]
        shape = (len(stage_names), len(class_names))
        self._sum = torch.zeros(shape, dtype=torch.float64)
        self._count = torch.zeros(shape, dtype=torch.float64)
        self._area_sum = torch.zeros(len(class_names), dtype=torch.float64)
        self._images = torch.zeros(len(class_names), dtype=torch.float64)
        self.num_images = 0

    def add(self, maps: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """Adds one image (``maps [S, K, H, W]``, ``gt [H, W]``); returns its ``[S, K]`` measures."""
        fractions = self.measure(maps, gt, self.ignore_label)
        seen = ~fractions.isnan()
        self._sum += fractions.nan_to_num(0.0)
        self._count += seen
        area = area_fractions(gt, len(self.class_names), self.ignore_label)
        self._area_sum += area.nan_to_num(0.0)
        self._images += ~area.isnan()
        self.num_images += 1
        return fractions

    def summary(self) -> List[Dict]:
        """One row per class that occurred: ``{"class", "images", "area", <stage>: mean fraction}``,
        then a ``"mean"`` row averaging the class rows (NaN skipped), whose "images" counts all."""
        means = self._sum / self._count  # NaN where never seen
        rows = []
        for k, name in enumerate(self.class_names):
            if self._images[k] == 0:
                continue
            row = {"class": name, "images": int(self._images[k]), "area": (self._area_sum[k] / self._images[k]).item()}
            row.update({stage: means[s, k].item() for s, stage in enumerate(self.stage_names)})
            rows.append(row)
        return with_mean_row(rows, self.stage_names, self.num_images)


def with_mean_row(rows: List[Dict], stage_names: Sequence[str], num_images: int) -> List[Dict]:
    """``rows`` (one per class) and, when there are any, a ``"mean"`` row: the mean of the class
    rows' area and stage values (NaN skipped), with ``num_images`` as its "images"."""
    if not rows:
        return rows
    mean = {"class": "mean", "images": num_images}
    for key in ["area"] + list(stage_names):
        values = [r[key] for r in rows if not math.isnan(r[key])]
        mean[key] = sum(values) / len(values) if values else math.nan
    return rows + [mean]


def format_concentration_table(rows: List[Dict], stage_names: Sequence[str]) -> str:
    """A Markdown table: class, images, area fraction, then the inside fraction per stage."""
    headers = ["class", "images", "area"] + list(stage_names)
    cells = [[r["class"], r["images"], *(f"{r[k]:.3f}" for k in headers[2:])] for r in rows]
    return tabulate(cells, headers=headers, tablefmt="pipe", disable_numparse=True,
                    colalign=["left"] + ["right"] * (len(headers) - 1))


def write_concentration(tables: Dict[str, List[Dict]], stage_names: Sequence[str], base_path: str) -> List[str]:
    """``base_path.json`` (``{"stages", <measure>: rows}``, NaN as null) and ``base_path.csv``
    (a "measure" column, then the rows' columns) of ``tables`` (measure name -> summary rows),
    each as a new file (a numbered name when one exists). Returns the paths written."""
    headers = ["class", "images", "area"] + list(stage_names)

    def write_json(tmp):
        document = {"stages": list(stage_names)}
        for measure, rows in tables.items():
            document[measure] = [nan_to_null(r) for r in rows]
        with open(tmp, "w") as f:
            json.dump(document, f, indent=2)

    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["measure"] + headers)
            writer.writerows([measure] + [r[k] for k in headers] for measure, rows in tables.items() for r in rows)

    return [save_new_file(base_path + ".json", write_json), save_new_file(base_path + ".csv", write_csv)]
