"""The authors' parameter names (RockeyCoss/StructToken on mmseg 0.20.2) <-> ours, as rules.

Each rule is a pair of name patterns, ``(authors', ours)``, read in either direction; ``{i}`` is
a block index, and a pattern ending in "." is a prefix (the rest of the name is kept). The first
rule that matches decides. Used by the checkpoint converter (``mmseg_conversion``), by
``MODEL.VIT.WEIGHTS`` for mmseg-format ViT files, and by the ``mmcv_custom_keys`` parameter
groups (which match the authors' keys against the authors' names).

- Backbone: mmseg ``VisionTransformer`` (``backbone.*``) <-> timm ``VisionTransformer``
  (``backbone.vit.*``); the top-level ``ln1`` is mmseg's final norm (``final_norm=True`` only).
- Decode head: ``decode_head.*`` <-> ``sem_seg_head.*``, same names except ``kernels`` ->
  ``tokens``; the head's 1x1 convolution weights ``[O, I, 1, 1]`` are our ``[O, I]``.
"""
import functools
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch

Rule = Tuple[str, str]

#: mmseg VisionTransformer names <-> timm VisionTransformer names (relative to the backbone).
VIT_RULES: Sequence[Rule] = (
    ("cls_token", "cls_token"),
    ("pos_embed", "pos_embed"),
    ("patch_embed.projection.", "patch_embed.proj."),
    ("layers.{i}.ln1.", "blocks.{i}.norm1."),
    ("layers.{i}.ln2.", "blocks.{i}.norm2."),
    ("layers.{i}.attn.attn.in_proj_weight", "blocks.{i}.attn.qkv.weight"),
    ("layers.{i}.attn.attn.in_proj_bias", "blocks.{i}.attn.qkv.bias"),
    ("layers.{i}.attn.attn.out_proj.", "blocks.{i}.attn.proj."),
    ("layers.{i}.ffn.layers.0.0.", "blocks.{i}.mlp.fc1."),
    ("layers.{i}.ffn.layers.1.", "blocks.{i}.mlp.fc2."),
    ("ln1.", "norm."),
)
#: The authors' decode head names <-> ours (relative to the head): only the tokens are renamed.
HEAD_RULES: Sequence[Rule] = (("kernels", "tokens"), ("", ""))
#: Whole-model prefixes: (authors', ours, rules applied to the rest of the name).
MODEL_PARTS: Sequence[Tuple[str, str, Sequence[Rule]]] = (
    ("backbone.", "backbone.vit.", VIT_RULES),
    ("decode_head.", "sem_seg_head.", HEAD_RULES),
)
AUTHORS, OURS = 0, 1


@functools.lru_cache(maxsize=None)
def _regex(pattern: str) -> "re.Pattern":
    body = re.escape(pattern).replace(re.escape("{i}"), r"(?P<i>\d+)")
    return re.compile(f"^{body}(?P<rest>.*)$" if pattern.endswith(".") or not pattern else f"^{body}$")


def _apply(name: str, rules: Sequence[Rule], src: int) -> Optional[str]:
    for rule in rules:
        match = _regex(rule[src]).match(name)
        if match:
            groups = match.groupdict()
            return rule[1 - src].replace("{i}", groups.get("i") or "") + (groups.get("rest") or "")
    return None


def vit_name_to_ours(name: str) -> Optional[str]:
    """An mmseg ``VisionTransformer`` parameter name -> timm's, or None when no rule applies."""
    return _apply(name, VIT_RULES, AUTHORS)


def _model_name(name: str, src: int) -> Optional[str]:
    for part in MODEL_PARTS:
        if name.startswith(part[src]):
            rest = _apply(name[len(part[src]):], part[2], src)
            return None if rest is None else part[1 - src] + rest
    return None


def authors_to_ours(name: str) -> Optional[str]:
    """``backbone.layers.0.ln1.weight`` -> ``backbone.vit.blocks.0.norm1.weight``; None if unknown."""
    return _model_name(name, AUTHORS)


def ours_to_authors(name: str) -> Optional[str]:
    """``sem_seg_head.tokens`` -> ``decode_head.kernels``; None for a name outside the authors' model."""
    return _model_name(name, OURS)


def is_head_pointwise_conv(ours_name: str, tensor: torch.Tensor) -> bool:
    """Whether an authors' tensor is a 1x1 convolution weight of the head, ``[O, I, 1, 1]``
    (stored by us as a linear ``[O, I]``)."""
    return ours_name.startswith("sem_seg_head.") and tensor.dim() == 4 and tuple(tensor.shape[2:]) == (1, 1)


def rename_authors_state_dict(state: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """The authors' model state dict -> ours (names and 1x1 conv layouts), and the keys no rule
    covers (not converted)."""
    ours, unknown = {}, []
    for name, tensor in state.items():
        new = authors_to_ours(name)
        if new is None:
            unknown.append(name)
            continue
        ours[new] = tensor.flatten(1) if is_head_pointwise_conv(new, tensor) else tensor
    return ours, unknown


def is_mmseg_vit_layout(keys) -> bool:
    """Whether a backbone state dict's keys are mmseg's ``VisionTransformer`` names
    (``patch_embed.projection.*``, ``layers.N.*``) rather than timm's."""
    return any(k.startswith("patch_embed.projection.") or re.match(r"layers\.\d+\.", k) for k in keys)
