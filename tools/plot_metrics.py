#!/usr/bin/env python
"""Loss, learning-rate and mIoU curves of a training run, from Detectron2's metrics.json, as one PNG.

    python tools/plot_metrics.py output/structtoken_shapes            # -> output/structtoken_shapes/curves.png
    python tools/plot_metrics.py OUTPUT_DIR --output curves_run2.png

Training writes OUTPUT_DIR/curves.png by itself when it ends; this redraws it (e.g. mid-run).
"""
import argparse
import sys

import structtoken_d2  # noqa: F401  (compat shims, before detectron2 submodules)
from structtoken_d2.visualization import plot_metrics


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="OUTPUT_DIR of a training run (holds metrics.json)")
    parser.add_argument("--output", default="", help="PNG to write (default OUTPUT_DIR/curves.png, replaced)")
    return parser


def main(argv=None) -> str:
    args = build_parser().parse_args(argv)
    try:
        path = plot_metrics(args.output_dir, args.output)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"plot_metrics: {e}")
    print(f"Curves written to {path}")
    return path


if __name__ == "__main__":
    main()
