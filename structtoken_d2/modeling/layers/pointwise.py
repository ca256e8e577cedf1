"""1x1 convolutions on channels-last tensors, and the authors' weight initialisation."""
import torch.nn as nn


class Conv1x1(nn.Linear):
    """A 1x1 convolution applied to a channels-last tensor ``[..., C_in] -> [..., C_out]``.

    Stored as an ``nn.Linear`` (weight ``[C_out, C_in]``, the authors' ``nn.Conv2d(k=1)`` weight
    without its two trailing unit dimensions). It stands in for a convolution, so
    :func:`init_structtoken_weights` initialises it as the authors initialise their 1x1
    convolutions (Kaiming normal, fan-in), not as their ``nn.Linear`` layers.
    """


def init_structtoken_weights(module: nn.Module) -> None:
    """The decode head's initialisation in the authors' code (mmcv ``init_weights`` of the head).

    - ``nn.Conv2d`` and :class:`Conv1x1`: Kaiming normal, ``mode="fan_in"``, ReLU gain, bias 0;
    - any other ``nn.Linear``: truncated normal, std 0.02, bias 0 (the head has none; kept for
      completeness);
    - ``nn.LayerNorm``: weight 1, bias 0.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, Conv1x1)):
            nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
