"""structtoken-d2: StructToken semantic segmentation as a Detectron2 project.

Importing the package applies the Detectron2 compatibility shims (:mod:`structtoken_d2.compat`)
and registers the backbone, head, meta-architecture and datasets with Detectron2's registries.
"""
from . import compat

compat.apply()

from .config import add_structtoken_config  # noqa: E402

__all__ = ["add_structtoken_config"]
