#!/usr/bin/env python
"""Convert a checkpoint of the authors' mmseg code (RockeyCoss/StructToken) into a Detectron2 one.

    python tools/convert_mmseg_checkpoint.py struct-token-cse_vit-t_ade20k.pth cse_vit_t_ade20k.pth
    python tools/train_net.py --config-file configs/ade20k/structtoken_cse_vit_t_512.yaml \\
        --eval-only MODEL.WEIGHTS cse_vit_t_ade20k.pth

SRC: an mmcv checkpoint ({"meta", "state_dict"}) or a bare state dict, keys backbone.* (mmseg
VisionTransformer) and decode_head.* (StructToken head). DST: {"model": ...} that MODEL.WEIGHTS
loads with no missing or unexpected keys. Prints what it converted and the config to use.
Refuses (and writes nothing) on unknown or missing keys, shape mismatches, or a class count other
than --num-classes; never replaces an existing DST unless --overwrite; never downloads anything.
"""
import argparse
import os
import sys

import structtoken_d2  # noqa: F401  (compat shims and registrations, before detectron2 submodules)
from structtoken_d2.modeling.mmseg_conversion import (
    STANDARD_VITS,
    MmsegCheckpointError,
    convert_state,
    matching_configs,
    read_mmseg_checkpoint,
    save_checkpoint,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="the authors' mmseg checkpoint (.pth)")
    parser.add_argument("dst", help="the Detectron2 checkpoint to write (.pth)")
    parser.add_argument("--num-classes", type=int, help="refuse a checkpoint with another class count")
    parser.add_argument("--num-heads", type=int,
                        help="ViT attention heads (not stored in weights; default: the checkpoint's meta "
                             "config, else the standard ViT of that width)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="read SRC with full unpickling (only for a file you trust whose meta holds "
                             "Python objects other than tensors, numbers, strings, lists and dicts)")
    parser.add_argument("--configs-dir", default=os.path.join(REPO, "configs"),
                        help="where to look for a config of the same model (default: the repository's)")
    return parser


def report(args, conversion) -> str:
    o = conversion.overrides
    standard = {v[0]: (w, *v[1:]) for w, v in STANDARD_VITS.items()}[o["MODEL.VIT.NAME"]]
    width, depth, heads = (o.get(f"MODEL.VIT.{k}", v) for k, v in zip(("EMBED_DIM", "DEPTH", "NUM_HEADS"), standard))
    backbone = sum(1 for k in conversion.state_dict if k.startswith("backbone."))
    lines = [
        f"Converted {args.src} -> {args.dst}",
        f"  {len(conversion.state_dict)} tensors ({backbone} backbone, {len(conversion.state_dict) - backbone} "
        f"head), checked key by key and shape by shape against the model below",
        f"  StructToken-{o['MODEL.STRUCTTOKEN.VARIANT']}, {o['MODEL.STRUCTTOKEN.NUM_BLOCKS']} blocks, "
        f"K = {o['MODEL.SEM_SEG_HEAD.NUM_CLASSES']} classes, tokens {o['MODEL.STRUCTTOKEN.TOKEN_SIZE']}",
        f"  ViT {o['MODEL.VIT.NAME']}: width {width}, depth {depth}, {heads} heads, input "
        f"{o['MODEL.VIT.IMG_SIZE']}, final norm {o['MODEL.VIT.FINAL_NORM']}",
    ]
    lines += [f"  note: {n}" for n in conversion.notes]
    configs = matching_configs(o, args.configs_dir)
    if configs:
        lines.append("Configs of this model (evaluate with the one of the dataset it was trained on):")
        lines += [f"  python tools/train_net.py --config-file {os.path.relpath(c)} --eval-only MODEL.WEIGHTS "
                  f"{args.dst}" for c in configs]
    else:
        lines += [
            "No config under configs/ builds this model; use the base config with these overrides (and the",
            "dataset, MODEL.PIXEL_MEAN / PIXEL_STD and test settings the model was trained with):",
            f"  python tools/train_net.py --config-file configs/Base-StructToken.yaml --eval-only "
            f"MODEL.WEIGHTS {args.dst} " + " ".join(conversion.opts()),
        ]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        state, meta = read_mmseg_checkpoint(args.src, trust_pickle=args.trust_pickle)
        conversion = convert_state(state, meta, args.src, num_classes=args.num_classes, num_heads=args.num_heads)
        save_checkpoint(conversion, args.src, args.dst, overwrite=args.overwrite)
    except (MmsegCheckpointError, FileNotFoundError, FileExistsError) as e:
        print(f"convert_mmseg_checkpoint: {e}; nothing written", file=sys.stderr)
        return 1
    print(report(args, conversion))
    return 0


if __name__ == "__main__":
    sys.exit(main())
