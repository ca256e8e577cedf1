from .vit import TimmViT, check_vit_weights_file, load_vit_weights, resize_pos_embed

__all__ = ["TimmViT", "check_vit_weights_file", "load_vit_weights", "resize_pos_embed"]
