"""Per-class IoU / accuracy of an evaluation: a sorted table for the log, JSON and CSV files."""
import csv
import json
import math
import numbers
import os
from typing import Dict, List, Mapping, Sequence, Tuple

from tabulate import tabulate

from ..output_files import replace_file

SUMMARY_KEYS = ("mIoU", "fwIoU", "mACC", "pACC")


def nan_to_null(row: Mapping) -> Dict:
    """``row`` with its NaN numbers replaced by None, written as JSON ``null`` (``json.dump`` would
    write ``NaN``, which is not JSON)."""
    return {k: None if isinstance(v, numbers.Real) and math.isnan(v) else v for k, v in row.items()}


def per_class_rows(results: Mapping[str, float], class_names: Sequence[str]) -> List[Dict]:
    """``{"class", "IoU", "Acc"}`` (percent) per class from :func:`metrics_from_confusion`'s
    ``IoU-<name>`` / ``ACC-<name>`` entries, best IoU first; classes with IoU NaN (absent from
    both ground truth and prediction) last, in class order."""
    rows = [{"class": name, "IoU": results[f"IoU-{name}"], "Acc": results[f"ACC-{name}"]} for name in class_names]
    return sorted(rows, key=lambda r: (math.isnan(r["IoU"]), -r["IoU"] if not math.isnan(r["IoU"]) else 0.0))


def format_per_class_table(rows: List[Dict]) -> str:
    """The rows as a Markdown ("pipe") table, NaN shown as "-" (Detectron2 logs its tables so)."""
    cells = [[r["class"], *("-" if math.isnan(r[k]) else f"{r[k]:.2f}" for k in ("IoU", "Acc"))] for r in rows]
    return tabulate(cells, headers=["class", "IoU", "Acc"], tablefmt="pipe", stralign="left", numalign="right")


def write_per_class_results(output_dir: str, dataset_name: str, results: Mapping[str, float],
                            rows: List[Dict]) -> Tuple[str, str]:
    """Writes ``output_dir/per_class_<dataset>.json`` (the summary metrics and the rows, NaN as
    null) and ``.csv`` (class,IoU,Acc; NaN as "nan"), each atomically, replacing those of an
    earlier evaluation. Returns both paths."""
    base = os.path.join(output_dir, f"per_class_{dataset_name}")
    summary = nan_to_null({k: results[k] for k in SUMMARY_KEYS if k in results})
    document = {"dataset": dataset_name, **summary, "classes": [nan_to_null(r) for r in rows]}

    def write_json(tmp):
        with open(tmp, "w") as f:
            json.dump(document, f, indent=2)

    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["class", "IoU", "Acc"])
            writer.writerows([r["class"], repr(r["IoU"]), repr(r["Acc"])] for r in rows)

    return replace_file(base + ".json", write_json), replace_file(base + ".csv", write_csv)
