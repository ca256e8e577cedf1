#!/usr/bin/env python
"""Parameter count and GFLOPs of StructToken configs, beside the paper's numbers.

    python tools/analyze_model.py --config-file configs/ade20k/structtoken_cse.yaml
    python tools/analyze_model.py --all                 # every model config, as a Markdown table
    python tools/analyze_model.py --all --no-flops      # parameters only (fast)

FLOPs are fvcore's (one multiply-add = one FLOP) for one forward of backbone + head on a single
window at the config's test crop (``TEST.SLIDE_CROP_SIZE`` in slide mode, else ``INPUT.CROP.SIZE``),
with the PyTorch reference ops. Two counts are printed:

- ``GFLOPs``: everything fvcore counts (linear, conv, layer norm, matmul), plus the ViT's fused
  attention (``scaled_dot_product_attention``, 2 * N^2 * C per block), which fvcore skips by default;
- ``mmcv-style``: the same without the ViT blocks' attention (qkv, output projection, attention
  products) and without the head's slice-attention products: what mmcv's ``get_flops``, which the
  paper used, sees (it counts registered module types only, so neither ``nn.MultiheadAttention``'s
  projections nor bare matrix products).
"""
import argparse
import glob
import os
import re
import sys

os.environ["STRUCTTOKEN_D2_FORCE_PYTORCH_OPS"] = "1"  # count the reference ops, not an opaque kernel

import structtoken_d2  # noqa: E402,F401  (registrations)
import torch  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from fvcore.nn import FlopCountAnalysis  # noqa: E402
from fvcore.nn.jit_handles import get_shape  # noqa: E402
from structtoken_d2.config_loading import load_config  # noqa: E402
from structtoken_d2.engine.user_errors import exit_on_user_error  # noqa: E402
from structtoken_d2.modeling.paper_numbers import PAPER_COMPLEXITY  # noqa: E402

CONFIG_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
MODEL_CONFIG_DIRS = ("ade20k", "cityscapes", "coco_stuff_10k")
_ATTN_MODULE = re.compile(r"^model\.backbone\.vit\.blocks\.\d+\.attn$")


def load_cfg(path, opts=()):
    cfg = load_config(path, opts)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.VIT.WEIGHTS = ""
    return cfg


def test_window(cfg):
    return tuple(cfg.TEST.SLIDE_CROP_SIZE if cfg.TEST.MODE == "slide" else cfg.INPUT.CROP.SIZE)


def _sdpa_flops(inputs, outputs):
    q, k = get_shape(inputs[0]), get_shape(inputs[1])  # [B, heads, Nq, d], [B, heads, Nk, d]
    batch_heads = 1
    for s in q[:-2]:
        batch_heads *= s
    return 2 * batch_heads * q[-2] * k[-2] * q[-1]


class _Decode(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.decode(x)


def count_flops(model, window):
    """``(fvcore GFLOPs, mmcv-style GFLOPs)`` of one forward at ``window``."""
    analysis = FlopCountAnalysis(_Decode(model).eval(), torch.zeros(1, 3, *window))
    analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_flops)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    with torch.no_grad():
        total = analysis.total()
    by_module = analysis.by_module()
    vit_attention = sum(v for k, v in by_module.items() if _ATTN_MODULE.match(k))
    head_products = analysis.by_module_and_operator().get("model.sem_seg_head", {}).get("matmul", 0)
    return total / 1e9, (total - vit_attention - head_products) / 1e9


def analyze(path, opts=(), flops=True):
    cfg = load_cfg(path, opts)
    model = build_model(cfg).eval()
    row = {
        "config": os.path.relpath(os.path.abspath(path), CONFIG_ROOT),
        "params": sum(p.numel() for p in model.parameters()) / 1e6,
        "backbone": sum(p.numel() for p in model.backbone.parameters()) / 1e6,
        "head": sum(p.numel() for p in model.sem_seg_head.parameters()) / 1e6,
        "window": test_window(cfg),
    }
    if flops:
        row["gflops"], row["gflops_mmcv"] = count_flops(model, row["window"])
    return row


def model_configs():
    paths = []
    for d in MODEL_CONFIG_DIRS:
        paths += sorted(p for p in glob.glob(os.path.join(CONFIG_ROOT, d, "structtoken_*.yaml")))
    return paths


def _fmt(v, spec):
    return "—" if v is None else format(v, spec)


def markdown(rows):
    lines = [
        "| config | table | window | params (M) | paper (M) | Δ params | GFLOPs (fvcore) | GFLOPs (mmcv-style) | paper GFLOPs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        table, p_params, p_flops = PAPER_COMPLEXITY.get(r["config"], ("IV" if "coco" in r["config"] else "—", None, None))
        delta = None if p_params is None else 100.0 * (r["params"] - p_params) / p_params
        lines.append(
            f"| {r['config']} | {table} | {r['window'][0]}x{r['window'][1]} | {r['params']:.1f} | {_fmt(p_params, 'g')} "
            f"| {_fmt(delta, '+.1f')}{'%' if delta is not None else ''} | {_fmt(r.get('gflops'), '.1f')} "
            f"| {_fmt(r.get('gflops_mmcv'), '.1f')} | {_fmt(p_flops, 'g')} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", action="append", default=[], help="config to analyse (repeatable)")
    parser.add_argument("--all", action="store_true", help="every config under configs/{ade20k,cityscapes,coco_stuff_10k}")
    parser.add_argument("--no-flops", action="store_true", help="parameters only")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ...")
    return parser


@exit_on_user_error
def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    paths = args.config_file + (model_configs() if args.all else [])
    if not paths:
        parser.error("give --config-file or --all")
    rows = []
    for path in paths:
        row = analyze(path, args.opts, flops=not args.no_flops)
        rows.append(row)
        print(f"{row['config']}: {row['params']:.2f}M params (backbone {row['backbone']:.2f}M, head {row['head']:.2f}M)"
              + (f", {row['gflops']:.1f} GFLOPs fvcore / {row['gflops_mmcv']:.1f} mmcv-style at "
                 f"{row['window'][0]}x{row['window'][1]}" if "gflops" in row else ""), file=sys.stderr, flush=True)
    print(markdown(rows))


if __name__ == "__main__":
    main()
