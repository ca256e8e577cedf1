"""Converting the authors' mmseg checkpoints (RockeyCoss/StructToken: mmseg ``VisionTransformer``
+ StructToken decode head) into Detectron2 checkpoints that ``MODEL.WEIGHTS`` loads strictly.

The names follow the rules of :mod:`.mmseg_names`. The model's configuration is read from the
tensors (widths, depth, class count, token size, variant, final norm); only the ViT's number
of attention heads is not stored in weights: it comes from ``--num-heads``, else the checkpoint's
``meta["config"]`` (mmseg writes its config there), else the standard ViT of that width. The
converted state dict is checked, key by key and shape by shape, against the model that
configuration builds (on the "meta" device, no memory) before anything is written. Nothing is
ever downloaded.
"""
import glob
import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..output_files import create_file, replace_file
from .mmseg_names import ours_to_authors, rename_authors_state_dict


class MmsegCheckpointError(ValueError):
    """An mmseg checkpoint that cannot be converted (the message names the file and keys)."""


#: Width -> (timm architecture, depth, heads) of the standard ViTs the authors use.
STANDARD_VITS = {
    192: ("vit_tiny_patch16_384", 12, 3),
    384: ("vit_small_patch16_384", 12, 6),
    768: ("vit_base_patch16_384", 12, 12),
    1024: ("vit_large_patch16_384", 24, 16),
}
_NEEDED_KEYS = ("backbone.pos_embed", "backbone.patch_embed.projection.weight", "decode_head.kernels",
                "decode_head.dec_proj.weight", "decode_head.layers.0.ffn1.pwconv1.weight")


@dataclass
class Conversion:
    """A converted checkpoint: our ``state_dict``, the config ``overrides`` (ordered) it needs,
    and ``notes`` on what was assumed."""

    state_dict: Dict[str, torch.Tensor]
    overrides: Dict[str, Any]
    notes: List[str] = field(default_factory=list)
    source_meta: Dict[str, Any] = field(default_factory=dict)

    def opts(self) -> List[str]:
        """The overrides as Detectron2 command-line ``KEY VALUE`` pairs."""
        return overrides_to_opts(self.overrides)


def overrides_to_opts(overrides: Dict[str, Any]) -> List[str]:
    """``{"MODEL.VIT.IMG_SIZE": [64, 64]}`` -> ``["MODEL.VIT.IMG_SIZE", "[64,64]"]`` (command line)."""
    out = []
    for key, value in overrides.items():
        out += [key, str(list(value)).replace(" ", "") if isinstance(value, (list, tuple)) else str(value)]
    return out


# ---------------------------------------------------------------------------- reading
def read_mmseg_checkpoint(path: str, trust_pickle: bool = False) -> Tuple[Dict[str, torch.Tensor], Dict]:
    """The state dict and ``meta`` of an mmcv checkpoint (``{"meta", "state_dict"}``) or of a
    bare state dict. Read with ``weights_only=True`` unless ``trust_pickle``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (checkpoints are never downloaded: give a local .pth)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:  # noqa: BLE001  (zip, pickle, EOF errors of a damaged or foreign file)
        hint = "" if trust_pickle else (" If it is a checkpoint you trust whose meta holds other Python "
                                        "objects, --trust-pickle reads it with full unpickling.")
        raise MmsegCheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0][:200]}).{hint}") from e
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        raise MmsegCheckpointError(f"{path} is a Detectron2 checkpoint ({{'model': ...}}), not an mmseg one: "
                                   f"load it with MODEL.WEIGHTS directly")
    meta = {}
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), dict) else {}
        ckpt = ckpt["state_dict"]
    if not isinstance(ckpt, dict) or not ckpt or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise MmsegCheckpointError(f"{path}: not an mmcv checkpoint ({{'meta', 'state_dict'}}) nor a state dict "
                                   f"of tensors")
    if all(k.startswith("module.") for k in ckpt):
        ckpt = {k[len("module."):]: v for k, v in ckpt.items()}
    if any(k.startswith(("sem_seg_head.", "backbone.vit.")) for k in ckpt):
        raise MmsegCheckpointError(f"{path} is already in this project's layout (sem_seg_head.* / backbone.vit.*): "
                                   f"load it with MODEL.WEIGHTS directly")
    if not any(k.startswith("backbone.") for k in ckpt) or not any(k.startswith("decode_head.") for k in ckpt):
        raise MmsegCheckpointError(f"{path}: unknown layout, expected the authors' mmseg model (keys backbone.* "
                                   f"and decode_head.*); found e.g. {sorted(ckpt)[:5]}")
    return ckpt, meta


# ---------------------------------------------------------------------------- config
def _layer_count(state: Dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for m in map(pattern.match, state) if m}
    return max(indices) + 1 if indices else 0


def _num_heads(embed_dim: int, meta: Dict, num_heads: Optional[int], notes: List[str]) -> int:
    if num_heads:
        return num_heads
    found = re.search(r"num_heads\s*=\s*(\d+)", str(meta.get("config", "")))
    if found:
        notes.append(f"ViT heads {found.group(1)}: from the checkpoint's meta config")
        return int(found.group(1))
    heads = STANDARD_VITS[embed_dim][2] if embed_dim in STANDARD_VITS else max(embed_dim // 64, 1)
    notes.append(f"ViT heads {heads}: not stored in the weights; assumed from the width "
                 f"{embed_dim} (64 per head); give --num-heads if the model had another count")
    return heads


def _variant(state: Dict[str, torch.Tensor], num_classes: int, path: str) -> str:
    if "decode_head.layers.0.attn.attn_pw_conv.weight" in state:
        return "PWE"
    query = state.get("decode_head.layers.0.cross_attn.query_map.conv1.weight")
    if query is None:
        raise MmsegCheckpointError(f"{path}: unknown decode head: neither decode_head.layers.0.cross_attn "
                                   f"(CSE / SSE) nor decode_head.layers.0.attn.attn_pw_conv (PWE)")
    return "CSE" if query.shape[0] == num_classes else "SSE"  # SSE slices the concatenation [C + K]


def infer_overrides(state: Dict[str, torch.Tensor], meta: Dict, path: str = "checkpoint",
                    num_heads: Optional[int] = None) -> Tuple[Dict[str, Any], List[str]]:
    """The config overrides (on ``configs/Base-StructToken.yaml``) that build the authors' model
    stored in ``state`` (authors' names), and notes on what was assumed."""
    missing = [k for k in _NEEDED_KEYS if k not in state]
    if missing:
        raise MmsegCheckpointError(f"{path}: missing key(s) {missing}, needed to recognise the model")
    notes: List[str] = []
    pos_embed, proj = state["backbone.pos_embed"], state["backbone.patch_embed.projection.weight"]
    embed_dim, patch = int(proj.shape[0]), int(proj.shape[-1])
    if patch != 16:
        raise MmsegCheckpointError(f"{path}: patch size {patch}; the TimmViT backbone is built for patch 16")
    grid = math.isqrt(pos_embed.shape[1] - 1)
    if pos_embed.dim() != 3 or grid * grid + 1 != pos_embed.shape[1]:
        raise MmsegCheckpointError(f"{path}: backbone.pos_embed {list(pos_embed.shape)} is not [1, 1 + n*n, C]")
    depth, heads = _layer_count(state, "backbone.layers."), _num_heads(embed_dim, meta, num_heads, notes)
    tokens = state["decode_head.kernels"]
    num_classes = int(tokens.shape[1])
    ffn = state["decode_head.layers.0.ffn1.pwconv1.weight"]
    channels = int(state["decode_head.dec_proj.weight"].shape[0])

    name, std_depth, std_heads = STANDARD_VITS.get(embed_dim, ("vit_tiny_patch16_384", None, None))
    out: Dict[str, Any] = {"MODEL.VIT.NAME": name}
    if (depth, heads) != (std_depth, std_heads):
        out.update({"MODEL.VIT.EMBED_DIM": embed_dim, "MODEL.VIT.DEPTH": depth, "MODEL.VIT.NUM_HEADS": heads})
    out["MODEL.VIT.IMG_SIZE"] = [grid * patch, grid * patch]
    out["MODEL.VIT.FINAL_NORM"] = "backbone.ln1.weight" in state
    out["MODEL.SEM_SEG_HEAD.NUM_CLASSES"] = num_classes
    out["MODEL.STRUCTTOKEN.VARIANT"] = _variant(state, num_classes, path)
    out["MODEL.STRUCTTOKEN.NUM_BLOCKS"] = _layer_count(state, "decode_head.layers.")
    out["MODEL.STRUCTTOKEN.TOKEN_SIZE"] = [int(tokens.shape[2]), int(tokens.shape[3])]
    out["MODEL.STRUCTTOKEN.CHANNELS"] = 0 if channels == embed_dim else channels
    out["MODEL.STRUCTTOKEN.FFN_RATIO"] = int(ffn.shape[0]) // int(ffn.shape[1])
    classes = meta.get("CLASSES")
    if classes is not None and len(classes) != num_classes:
        notes.append(f"meta CLASSES lists {len(classes)} names but the tokens hold {num_classes} classes")
    return out, notes


# ---------------------------------------------------------------------------- checking
def build_cfg(overrides: Dict[str, Any]):
    """The Detectron2 config of the StructToken segmentor with ``overrides`` (no config file)."""
    from detectron2.config import get_cfg

    from ..config import add_structtoken_config

    cfg = get_cfg()
    add_structtoken_config(cfg)
    cfg.MODEL.META_ARCHITECTURE, cfg.MODEL.BACKBONE.NAME = "StructTokenSegmentor", "TimmViT"
    cfg.MODEL.SEM_SEG_HEAD.NAME, cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = "StructTokenHead", ["last_feat"]
    cfg.merge_from_list(overrides_to_opts(overrides))  # as the printed command line would
    return cfg


def expected_shapes(overrides: Dict[str, Any]) -> Dict[str, Tuple[int, ...]]:
    """Names and shapes of the state dict of the model ``overrides`` describe (built on "meta")."""
    from detectron2.modeling import build_model

    cfg = build_cfg(overrides)
    cfg.MODEL.DEVICE = "meta"
    try:
        with torch.device("meta"):
            model = build_model(cfg)
    except Exception as e:  # noqa: BLE001  (e.g. a width the head count does not divide)
        raise MmsegCheckpointError(f"cannot build the model {overrides}: {e}") from e
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_state_dict(state: Dict[str, torch.Tensor], overrides: Dict[str, Any], path: str) -> None:
    """Raise, naming the keys (the authors' names), unless ``state`` (ours) fits the model exactly."""
    shapes = expected_shapes(overrides)
    missing = sorted(ours_to_authors(k) or k for k in shapes if k not in state)
    unexpected = sorted(ours_to_authors(k) or k for k in state if k not in shapes)
    wrong = sorted(f"{ours_to_authors(k) or k} {list(state[k].shape)} (expected {list(s)})"
                   for k, s in shapes.items() if k in state and tuple(state[k].shape) != s)
    problems = [f"{label}: {items}" for label, items in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)) if items]
    if problems:
        raise MmsegCheckpointError(f"{path} does not fit the model it describes ({overrides}); "
                                   + "; ".join(problems))


# ---------------------------------------------------------------------------- converting
def convert_state(state: Dict[str, torch.Tensor], meta: Dict, path: str = "checkpoint",
                  num_classes: Optional[int] = None, num_heads: Optional[int] = None) -> Conversion:
    """Convert an authors' state dict (as read by :func:`read_mmseg_checkpoint`) and check it."""
    overrides, notes = infer_overrides(state, meta, path, num_heads)
    found = overrides["MODEL.SEM_SEG_HEAD.NUM_CLASSES"]
    if num_classes is not None and num_classes != found:
        raise MmsegCheckpointError(f"{path} has {found} classes (decode_head.kernels of shape "
                                   f"{list(state['decode_head.kernels'].shape)}), not --num-classes {num_classes}")
    ours, unknown = rename_authors_state_dict(state)
    if unknown:
        raise MmsegCheckpointError(f"{path}: keys no rule of the authors' layout covers: {sorted(unknown)}")
    check_state_dict(ours, overrides, path)
    source_meta = {k: meta[k] for k in ("mmseg_version", "CLASSES", "iter") if k in meta}
    return Conversion(ours, overrides, notes, source_meta)


def save_checkpoint(conversion: Conversion, src: str, dst: str, overwrite: bool = False) -> None:
    """Write ``{"model": ..., "meta": ...}`` to ``dst`` whole or not at all (temporary file, then
    renamed); an existing ``dst`` is refused unless ``overwrite``."""
    if os.path.abspath(src) == os.path.abspath(dst):
        raise MmsegCheckpointError(f"{dst}: the destination is the source checkpoint itself")
    meta = {"converted_from": os.path.basename(src), **conversion.source_meta}
    try:
        (replace_file if overwrite else create_file)(
            dst, lambda tmp: torch.save({"model": conversion.state_dict, "meta": meta}, tmp))
    except FileExistsError:
        raise FileExistsError(f"{dst} exists; pass --overwrite to replace it") from None


def matching_configs(overrides: Dict[str, Any], configs_dir: str) -> List[str]:
    """The YAML files under ``configs_dir`` whose model equals the one ``overrides`` describe."""
    from detectron2.config import get_cfg

    from ..config import add_structtoken_config

    wanted = _model_signature(build_cfg(overrides).MODEL)
    matches = []
    config_logger = logging.getLogger("detectron2.config")
    level = config_logger.level
    config_logger.setLevel(logging.ERROR)  # not "config has no VERSION" for every file looked at
    try:
        for path in sorted(glob.glob(os.path.join(configs_dir, "*", "structtoken_*.yaml"))):
            cfg = get_cfg()
            add_structtoken_config(cfg)
            try:
                cfg.merge_from_file(path)
            except Exception:  # noqa: BLE001  (a config of another project version: not a match)
                continue
            if _model_signature(cfg.MODEL) == wanted:
                matches.append(path)
    finally:
        config_logger.setLevel(level)
    return matches


def _model_signature(m) -> Tuple:
    name, depth, heads = m.VIT.NAME, m.VIT.DEPTH, m.VIT.NUM_HEADS
    std = next((v for v in STANDARD_VITS.values() if v[0] == name), (name, 0, 0))
    width = m.VIT.EMBED_DIM or next((w for w, v in STANDARD_VITS.items() if v[0] == name), 0)
    st = m.STRUCTTOKEN
    return (width, depth or std[1], heads or std[2], tuple(m.VIT.IMG_SIZE), m.VIT.FINAL_NORM,
            m.SEM_SEG_HEAD.NUM_CLASSES, st.VARIANT, st.NUM_BLOCKS, tuple(st.TOKEN_SIZE),
            st.CHANNELS or width, st.FFN_RATIO)
