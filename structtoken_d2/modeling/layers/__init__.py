"""Building blocks of the StructToken decode head; all but :class:`ResBlock` work channels-last."""
from .ffn import GroupConvFFN
from .pointwise import Conv1x1, init_structtoken_weights
from .projection import DepthwiseProjection
from .resblock import ResBlock

__all__ = ["Conv1x1", "DepthwiseProjection", "GroupConvFFN", "ResBlock", "init_structtoken_weights"]
