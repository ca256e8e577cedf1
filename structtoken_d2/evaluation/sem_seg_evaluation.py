"""Semantic-segmentation metrics (mmseg's definitions) in Detectron2's ``sem_seg`` result format."""
import logging
from collections import OrderedDict
from typing import Dict, List, Optional

import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from ..data import read_sem_seg_label
from ..data.datasets import IGNORE_LABEL
from .per_class_table import format_per_class_table, per_class_rows, write_per_class_results


def confusion_matrix(pred: torch.Tensor, gt: torch.Tensor, num_classes: int, ignore_label: int) -> torch.Tensor:
    """[K, K] int64 counts, rows = ground truth, columns = prediction, pixels labelled
    ``ignore_label`` skipped. ``pred``, ``gt``: [H, W] integer tensors on the same device."""
    valid = gt != ignore_label
    gt_valid = gt[valid].long()
    if gt_valid.numel() and (gt_valid.min() < 0 or gt_valid.max() >= num_classes):
        raise ValueError(
            f"Ground truth holds labels outside 0..{num_classes - 1} and {ignore_label} (ignore): "
            f"check the dataset's label maps and its metadata stuff_classes"
        )
    index = gt_valid * num_classes + pred[valid].long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def metrics_from_confusion(conf: torch.Tensor, class_names: List[str]) -> "OrderedDict[str, float]":
    """mIoU, fwIoU, mACC, pACC and per-class IoU-/ACC- (percent) from a [K, K] confusion matrix.

    A class absent from both ground truth and prediction has IoU NaN; one absent from the ground
    truth has ACC NaN; NaN entries are left out of the means (mmseg ``nanmean``)."""
    conf = conf.double()
    tp = conf.diagonal()
    gt_count, pred_count = conf.sum(1), conf.sum(0)
    iou = tp / (gt_count + pred_count - tp)  # 0 / 0 = NaN for absent classes
    acc = tp / gt_count
    freq = gt_count / gt_count.sum()
    seen = ~iou.isnan()
    res = OrderedDict()
    res["mIoU"] = 100 * iou.nanmean().item()
    res["fwIoU"] = 100 * (freq[seen] * iou[seen]).sum().item()
    for name, value in zip(class_names, iou.tolist()):
        res[f"IoU-{name}"] = 100 * value
    res["mACC"] = 100 * acc.nanmean().item()
    res["pACC"] = 100 * (tp.sum() / gt_count.sum()).item()
    for name, value in zip(class_names, acc.tolist()):
        res[f"ACC-{name}"] = 100 * value
    return res


class SemSegEvaluator(DatasetEvaluator):
    """Accumulates a confusion matrix with ``torch.bincount`` on the predictions' device, sums it
    over processes and reports the metrics under ``results["sem_seg"]``.

    Each model output needs ``sem_seg`` [K, H, W] scores at the original image size; the ground
    truth is read from the input's dataset record (``sem_seg_file_name``). The main process logs a
    per-class IoU / Acc table (best first) and, with ``output_dir``, writes it to
    ``output_dir/per_class_<dataset>.json`` and ``.csv``.
    """

    def __init__(self, dataset_name: str, distributed: bool = True, output_dir: Optional[str] = None):
        """``output_dir``: folder of the per-class JSON / CSV files; None writes none."""
        meta = MetadataCatalog.get(dataset_name)
        if not hasattr(meta, "stuff_classes"):
            raise ValueError(f"Dataset '{dataset_name}' has no metadata 'stuff_classes': register its class names")
        self._class_names = list(meta.stuff_classes)
        self._num_classes = len(self._class_names)
        self._ignore_label = getattr(meta, "ignore_label", IGNORE_LABEL)
        self._distributed = distributed
        self._dataset_name = dataset_name
        self._output_dir = output_dir
        self._conf: Optional[torch.Tensor] = None

    def reset(self) -> None:
        self._conf = None

    def process(self, inputs: List[Dict], outputs: List[Dict]) -> None:
        for inp, out in zip(inputs, outputs):
            scores = out["sem_seg"]
            pred = scores.argmax(dim=0)
            if "sem_seg_file_name" not in inp:
                raise KeyError(
                    f"Input {inp.get('file_name')} has no 'sem_seg_file_name': evaluate with a mapper "
                    f"that keeps the dataset record's fields (SemanticSegmentationMapper does)"
                )
            label = read_sem_seg_label(inp, self._num_classes, self._ignore_label)  # range errors name the file
            gt = torch.as_tensor(label, device=pred.device)
            if gt.shape != pred.shape:
                raise ValueError(
                    f"Prediction for {inp['file_name']} is {tuple(pred.shape)} but its ground truth is "
                    f"{tuple(gt.shape)}: the model must return sem_seg at the original image size"
                )
            conf = confusion_matrix(pred, gt, self._num_classes, self._ignore_label)
            self._conf = conf if self._conf is None else self._conf + conf

    def evaluate(self) -> "OrderedDict[str, Dict[str, float]]":
        conf = self._conf
        if conf is None:
            conf = torch.zeros(self._num_classes, self._num_classes, dtype=torch.int64)
        if self._distributed:
            comm.synchronize()
            gathered = comm.all_gather(conf.cpu())
            if not comm.is_main_process():
                return OrderedDict()
            conf = torch.stack(gathered).sum(0)
        if conf.sum() == 0:
            logging.getLogger(__name__).warning("SemSegEvaluator got no labelled pixel to evaluate")
        results = metrics_from_confusion(conf.cpu(), self._class_names)
        self._report_per_class(results)
        return OrderedDict(sem_seg=results)

    def _report_per_class(self, results) -> None:
        """Logs the per-class table and writes its JSON / CSV files (main process only)."""
        if not comm.is_main_process():
            return
        rows = per_class_rows(results, self._class_names)
        logger = logging.getLogger(__name__)
        logger.info("Per-class results on %s (mIoU %.2f):\n%s", self._dataset_name, results["mIoU"],
                    format_per_class_table(rows))
        if self._output_dir:
            paths = write_per_class_results(self._output_dir, self._dataset_name, results, rows)
            logger.info("Per-class results written to %s", " and ".join(paths))
