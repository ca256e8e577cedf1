from .extraction import CSE, EXTRACTION_REGISTRY, PWE, SSE, SliceAttention, build_extraction_block
from .structtoken_head import StructTokenHead

__all__ = ["CSE", "EXTRACTION_REGISTRY", "PWE", "SSE", "SliceAttention", "StructTokenHead", "build_extraction_block"]
