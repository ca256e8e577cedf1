from .vit import TimmViT, load_vit_weights, resize_pos_embed

__all__ = ["TimmViT", "load_vit_weights", "resize_pos_embed"]
