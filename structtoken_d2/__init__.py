"""structtoken-d2: StructToken semantic segmentation as a Detectron2 project.

Importing the package applies the Detectron2 compatibility shims (:mod:`structtoken_d2.compat`)
and registers the backbone, head, meta-architecture and datasets with Detectron2's registries.
"""
from . import compat

compat.apply()

from .config import add_structtoken_config  # noqa: E402
from . import data, evaluation  # noqa: E402,F401  (dataset and mapper registrations)
from . import modeling  # noqa: E402,F401  (backbone, head, meta-architecture registrations)

__all__ = ["add_structtoken_config"]
