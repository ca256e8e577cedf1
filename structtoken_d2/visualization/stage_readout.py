"""How well the classes can be read, pixel by pixel, from each stage of the head: a linear readout.

The concentration measures (:mod:`.token_concentration`) ask whether class k's *own* slice marks
out class k's region. The readout asks whether a stage holds the class at all, in whichever of its
channels: a multinomial logistic regression from a pixel's channels (the K slices of a stage, or
the C channels of the backbone's feature) to its label, fitted on pixels of half the images (the
1st, 3rd, 5th ...) and scored on pixels of the others as an IoU per class. A stage whose slices mix
or permute the classes reads out well while its separation stays near 0.5; a stage with no trace
of a class reads out near 0 IoU for it.

The fit: channels standardised with the fitting pixels' mean and std, float64, L-BFGS on the
cross-entropy plus ``l2 * |W|^2``, from zero weights; a fixed number of labelled pixels sampled per
image with a seeded generator, so that a run is reproducible.
"""
import math
from typing import Callable, Dict, List, Sequence

import torch
import torch.nn.functional as F

from .token_concentration import with_mean_row


def fit_linear_readout(x: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float = 1e-4,
                       max_iter: int = 200) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x [N, D]``, ``labels [N]`` (in ``0 ... num_classes - 1``) -> the fitted readout, a function
    ``[M, D] -> [M]`` of predicted labels."""
    x = x.double()
    mean, std = x.mean(0), x.std(0).clamp(min=1e-12)
    z = (x - mean) / std
    weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(z @ weight + bias, labels) + l2 * (weight ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    weight, bias = weight.detach(), bias.detach()
    return lambda new: (((new.double() - mean) / std) @ weight + bias).argmax(1)


def class_ious(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[K]`` float64 IoU of each class over the pixels given; NaN for a class neither predicted
    nor present."""
    pred = F.one_hot(predicted, num_classes).bool()
    true = F.one_hot(labels, num_classes).bool()
    union = (pred | true).sum(0).double()
    iou = (pred & true).sum(0).double() / union
    iou[union == 0] = math.nan
    return iou


class StageReadout:
    """Collects sampled pixels of every stage over images, then fits and scores one readout per stage.

    ``add(stages, gt)`` per image, ``stages`` a list (in ``stage_names`` order) of maps
    ``[D_s, H, W]`` at the size of ``gt [H, W]``; ``summary()`` gives rows as
    :class:`.ConcentrationMeter` does: ``{"class", "images", "area", <stage>: held-out IoU}`` per
    class present in the scored images, then a ``"mean"`` row.
    """

    def __init__(self, stage_names: Sequence[str], class_names: Sequence[str], ignore_label: int,
                 pixels_per_image: int = 256, seed: int = 0):
        self.stage_names = list(stage_names)
        self.class_names = list(class_names)
        self.ignore_label = ignore_label
        self.pixels_per_image = pixels_per_image
        self._generator = torch.Generator().manual_seed(seed)
        self._samples: List[List[torch.Tensor]] = [[] for _ in self.stage_names]  # per stage, per image: [n, D_s]
        self._labels: List[torch.Tensor] = []

    def add(self, stages: Sequence[torch.Tensor], gt: torch.Tensor) -> None:
        if len(stages) != len(self.stage_names):
            raise ValueError(f"expected {len(self.stage_names)} stages ({', '.join(self.stage_names)}), "
                             f"got {len(stages)}")
        labelled = (gt != self.ignore_label).flatten().nonzero().squeeze(1)
        chosen = labelled[torch.randperm(labelled.numel(), generator=self._generator)[: self.pixels_per_image]]
        for samples, name, stage in zip(self._samples, self.stage_names, stages):
            if tuple(stage.shape[-2:]) != tuple(gt.shape):
                raise ValueError(f"stage {name}: maps of size {tuple(stage.shape[-2:])} for a label of size "
                                 f"{tuple(gt.shape)}")
            samples.append(stage.reshape(stage.shape[0], -1)[:, chosen].T.float())
        self._labels.append(gt.flatten()[chosen].long())

    def summary(self) -> List[Dict]:
        num_images = len(self._labels)
        if num_images < 2:
            raise ValueError(f"the readout needs 2 labelled images or more (one to fit, one to score), "
                             f"got {num_images}")
        k = len(self.class_names)
        fit, scored = range(0, num_images, 2), range(1, num_images, 2)
        fit_labels = torch.cat([self._labels[i] for i in fit])
        scored_labels = torch.cat([self._labels[i] for i in scored])
        ious = []
        for samples in self._samples:
            readout = fit_linear_readout(torch.cat([samples[i] for i in fit]), fit_labels, k)
            ious.append(class_ious(readout(torch.cat([samples[i] for i in scored])), scored_labels, k))
        images = torch.zeros(k)
        area = torch.zeros(k, dtype=torch.float64)
        for i in scored:  # the classes' pixel shares of the sampled pixels, over the images holding them
            counts = torch.bincount(self._labels[i], minlength=k).double()
            images += counts > 0
            area += counts / counts.sum().clamp(min=1)
        rows = []
        for c, name in enumerate(self.class_names):
            if images[c] == 0:
                continue
            row = {"class": name, "images": int(images[c]), "area": (area[c] / images[c]).item()}
            row.update({stage: ious[s][c].item() for s, stage in enumerate(self.stage_names)})
            rows.append(row)
        return with_mean_row(rows, self.stage_names, len(scored))
