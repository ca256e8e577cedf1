"""The StructToken model; importing this package registers it with Detectron2's registries:
backbone ``TimmViT`` (BACKBONE_REGISTRY), head ``StructTokenHead`` (SEM_SEG_HEADS_REGISTRY),
meta-architecture ``StructTokenSegmentor`` (META_ARCH_REGISTRY), and the extraction modules
``CSE`` / ``SSE`` / ``PWE`` (EXTRACTION_REGISTRY)."""
from .backbone import TimmViT, load_vit_weights, resize_pos_embed
from .checkpoint import CheckpointMismatchError, ClassCountMismatchError, StructTokenCheckpointer, check_num_classes
from .heads import CSE, EXTRACTION_REGISTRY, PWE, SSE, StructTokenHead, build_extraction_block
from .meta_arch import StructTokenSegmentor, check_dataset_num_classes

__all__ = [
    "CSE", "EXTRACTION_REGISTRY", "PWE", "SSE", "CheckpointMismatchError", "ClassCountMismatchError",
    "StructTokenCheckpointer", "StructTokenHead", "StructTokenSegmentor", "TimmViT", "build_extraction_block",
    "check_dataset_num_classes", "check_num_classes", "load_vit_weights", "resize_pos_embed",
]
