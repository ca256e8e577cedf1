"""Multi-scale + flip test-time augmentation as the authors' mmseg ``MultiScaleFlipAug``: for every
ratio r, the ORIGINAL image is resized keep-ratio to ``TEST.SCALE * r`` and run through the model
(its ``TEST.MODE`` whole/slide inference), unflipped and horizontally flipped; each run's logits
are resized to the original size, turned into probabilities (softmax) and flipped back, and
the probabilities of all runs are averaged."""
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.transforms import ResizeToScale


class SemanticSegmentorWithTTA(nn.Module):
    """Wraps a Detectron2 semantic segmentor whose eval ``forward`` returns ``sem_seg`` logits
    [K, height, width] at each input's ``height`` / ``width``.

    Inputs must hold the original (unresized) image: build the test loader with
    ``resize_to_test_scale=False``. Returns ``[{"sem_seg": [K, H, W] mean probabilities}]``.
    """

    def __init__(
        self,
        cfg,
        model: nn.Module,
        ratios: Optional[Sequence[float]] = None,
        flip: Optional[bool] = None,
        scale: Optional[Sequence[int]] = None,
    ):
        """``ratios``, ``flip``, ``scale`` default to ``TEST.AUG.RATIOS``, ``TEST.AUG.FLIP`` and
        ``TEST.SCALE``."""
        super().__init__()
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        self.model = model
        self.ratios = list(cfg.TEST.AUG.RATIOS if ratios is None else ratios)
        self.flip = cfg.TEST.AUG.FLIP if flip is None else flip
        self.scale = list(cfg.TEST.SCALE if scale is None else scale)
        if not self.ratios:
            raise ValueError("TEST.AUG.RATIOS is empty: give at least one resize ratio, e.g. [1.0]")

    def forward(self, batched_inputs: List[Dict]) -> List[Dict]:
        return [{"sem_seg": self._predict_probabilities(inp)} for inp in batched_inputs]

    @torch.no_grad()
    def _predict_probabilities(self, inp: Dict) -> torch.Tensor:
        image = inp["image"]  # [3, h, w] uint8, original size
        height, width = inp.get("height", image.shape[1]), inp.get("width", image.shape[2])
        image_hwc = image.permute(1, 2, 0).cpu().numpy()
        total, runs = None, 0
        for ratio in self.ratios:
            resize = ResizeToScale(self.scale, (ratio, ratio)).get_transform(image_hwc)
            resized = torch.as_tensor(np.ascontiguousarray(resize.apply_image(image_hwc).transpose(2, 0, 1)))
            views = [resized] + ([resized.flip(-1)] if self.flip else [])
            outputs = self.model([{"image": v, "height": height, "width": width} for v in views])
            for view_index, out in enumerate(outputs):
                probs = F.softmax(out["sem_seg"].float(), dim=0)
                if view_index == 1:
                    probs = probs.flip(-1)
                total = probs if total is None else total + probs
                runs += 1
        return total / runs
