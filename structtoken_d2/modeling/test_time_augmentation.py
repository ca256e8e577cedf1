"""Multi-scale + flip test-time augmentation as the authors' mmseg ``MultiScaleFlipAug``: for every
ratio r, the ORIGINAL image is resized keep-ratio to ``TEST.SCALE * r`` and run through the model
(its ``TEST.MODE`` whole/slide inference), unflipped and horizontally flipped; each run's logits
are resized to the original size, turned into probabilities (softmax) and flipped back, and
the probabilities of all runs are averaged. The views of equal size (an image and its flip, and
ratios that give the same size) go to the model in one call, which batches them (``TEST.SLIDE_BATCH``)
and, where it has ``iter_inference`` (StructTokenSegmentor), hands their logits over one at a time:
each is added to the running sum and let go before the next is made."""
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

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
        views_by_size: Dict[Tuple[int, int], List[Tuple[torch.Tensor, bool]]] = {}  # (view, flipped)
        for ratio in self.ratios:
            resize = ResizeToScale(self.scale, (ratio, ratio)).get_transform(image_hwc)
            resized = torch.as_tensor(np.ascontiguousarray(resize.apply_image(image_hwc).transpose(2, 0, 1)))
            views = views_by_size.setdefault(tuple(resized.shape[-2:]), [])
            views += [(resized, False)] + ([(resized.flip(-1), True)] if self.flip else [])
        total, runs = None, 0
        for views in views_by_size.values():
            inputs = [{"image": view, "height": height, "width": width} for view, _ in views]
            for index, output in self._outputs(inputs):
                total = self._add_probabilities(total, output.pop("sem_seg"), flipped=views[index][1])
                runs += 1
        return total.div_(runs)

    def _outputs(self, inputs: List[Dict]) -> Iterator[Tuple[int, Dict]]:
        """``(index, output)`` of each input: from ``model.iter_inference`` where the model has it (one
        output alive at a time), else from its ``forward`` (all at once)."""
        if hasattr(self.model, "iter_inference"):
            return self.model.iter_inference(inputs)
        return enumerate(self.model(inputs))

    @staticmethod
    def _add_probabilities(total: Optional[torch.Tensor], logits: torch.Tensor, flipped: bool) -> torch.Tensor:
        """``total`` (None at first) + the probabilities of a view's ``logits [K, H, W]``, flipped back
        if its view was flipped. The softmax runs over K as the last dim: the segmentor's logits are
        channels-last, so this reads them in memory order (a softmax over dim 0 would first copy them
        channels-first)."""
        probs = F.softmax(logits.float().movedim(0, -1), dim=-1).movedim(-1, 0)
        if flipped:
            probs = probs.flip(-1)
        return probs if total is None else total.add_(probs)
