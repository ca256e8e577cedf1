#!/usr/bin/env python
"""Structure-token maps of a trained StructToken model, block by block (paper Fig. 4).

    # 4 validation images (ground truth shown), and the concentration over the whole split:
    python tools/visualize_tokens.py --config-file configs/synthetic/structtoken_shapes.yaml \\
        --dataset shapes_sem_seg_val --num 4 --measure --output output/structtoken_shapes/token_maps \\
        MODEL.WEIGHTS output/structtoken_shapes/model_final.pth
    # your images (a file or a folder; --gt: a folder of label PNGs named like the images):
    python tools/visualize_tokens.py --config-file CFG --input photos/ --output out/ \\
        --classes car door MODEL.WEIGHTS model.pth

Per image, <output>/<image name>_tokens.png: the image, ground truth (when known) and prediction
with a legend; below, one row per class (default: the classes of the ground truth when known,
else of the prediction): S (the learned tokens resized to the feature grid), S1 ... SL (the tokens
after each extraction block) and Y (the final ResBlock's score map), one colour scale per row
(--scale map: one per map).
The maps are read with forward hooks during one whole-image pass at the test scale, and brought to
the image size as the logits are. A name already taken gets a number (_1, _2...): nothing is
ever written over.

--measure: the share of each class map's positive mass inside the class's ground-truth region,
per stage, averaged over the images holding the class (all of --dataset, or every --input with a
label), beside the region's area share (what an even map scores); also "centred", the same for the
maps minus their mean over the image (independent of a map's offset), and "separation", the ROC AUC
of the map for the region (the chance that a region pixel is higher than a pixel outside: 0.5 for a
map that does not tell the region apart, 1 for a perfect one; offset- and scale-free). Printed as Markdown tables
and written to <output>/token_concentration.json and .csv. The figures print each map's positive-
mass share in its corner ("in"). Also the "readout" of every stage and of the backbone's feature F:
the IoU of each class as a linear classifier, fitted on 256 pixels of each of half the labelled
images, reads it from the stage's channels on the other half (whether a stage holds the class at all,
in whichever slices), written to <output>/stage_readout.json and .csv. F is held at image size for
each image in turn (C x H x W floats: 1.4 GB for C = 1024 and 512 x 683 pixels).
"""
import argparse
import glob
import os
import sys

import torch

import structtoken_d2  # noqa: F401  (compat shims and registrations, before detectron2 submodules)
from detectron2.data import DatasetCatalog, MetadataCatalog
from structtoken_d2.config_loading import load_config, move_swallowed_overrides, use_cpu_without_gpu
from structtoken_d2.data import read_image_file, read_sem_seg_label
from structtoken_d2.data.datasets import IGNORE_LABEL, register_folder_datasets_from_config
from structtoken_d2.data.datasets.folder import IMAGE_EXTENSIONS
from structtoken_d2.engine import StructTokenPredictor
from structtoken_d2.engine.dataset_checks import check_datasets
from structtoken_d2.engine.user_errors import exit_on_user_error
from structtoken_d2.evaluation import shown_classes
from structtoken_d2.output_files import save_new_file
from structtoken_d2.visualization import (
    COLOUR_SCALES,
    MEASURES,
    ConcentrationMeter,
    StageReadout,
    format_concentration_table,
    predict_token_maps,
    token_map_figure,
    write_concentration,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="image files and/or folders of images")
    source.add_argument("--dataset", help="a registered dataset, e.g. shapes_sem_seg_val (ground truth shown)")
    parser.add_argument("--gt", help="with --input: folder of label PNGs (train ids) named <image name>.png")
    parser.add_argument("--num", type=int, default=None,
                        help="figures for the first N images (default: 4 of --dataset, every --input)")
    parser.add_argument("--classes", nargs="+", help="class names to draw (default: those in the ground truth, "
                        "else in the prediction)")
    parser.add_argument("--scale", choices=COLOUR_SCALES, default="row",
                        help="colour scale: one per class row (default, with a colour bar) or one per map "
                        "(shows maps far weaker than the row's strongest)")
    parser.add_argument("--measure", action="store_true", help="measure the maps' concentration on the "
                        "ground-truth regions over all images with a label")
    parser.add_argument("--output", required=True, help="folder of the figures (and measurements)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ... (MODEL.WEIGHTS)")
    return parser


def parse_args(argv=None):
    return move_swallowed_overrides(build_parser().parse_args(argv), "input", "classes")


def input_records(paths, gt_dir):
    """Dataset-style records of the images under ``paths``, with ``sem_seg_file_name`` from ``gt_dir``."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(f for f in glob.glob(os.path.join(path, "*"))
                           if os.path.splitext(f)[1].lower().lstrip(".") in IMAGE_EXTENSIONS)
            if not found:
                sys.exit(f"--input {path}: no image ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        else:
            sys.exit(f"--input {path}: no such file or folder")
    records = []
    for f in files:
        record = {"file_name": f}
        if gt_dir:
            label = os.path.join(gt_dir, os.path.splitext(os.path.basename(f))[0] + ".png")
            if not os.path.isfile(label):
                sys.exit(f"--gt {gt_dir}: no label {label} for the image {f}")
            record["sem_seg_file_name"] = label
        records.append(record)
    return records


def class_ids_from_names(names, class_names):
    unknown = [n for n in names if n not in class_names]
    if unknown:
        sys.exit(f"--classes {' '.join(unknown)}: not a class of this model; valid: {', '.join(class_names)}")
    return [class_names.index(n) for n in names]


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    if args.gt and not args.input:
        sys.exit("--gt goes with --input (a --dataset brings its own ground truth)")
    cfg = load_config(args.config_file, args.opts)
    use_cpu_without_gpu(cfg)
    cfg.MODEL.COMPILE = False  # the maps are read with forward hooks on the eager blocks
    cfg.TEST.AUG.ENABLED = False  # the maps are of one whole-image pass at the test scale
    cfg.freeze()

    register_folder_datasets_from_config(cfg)
    check_datasets(cfg, [args.dataset] if args.dataset else [])
    if not args.dataset and not cfg.DATASETS.TEST:
        sys.exit("DATASETS.TEST is empty: name the dataset whose classes and colours to use")
    meta = MetadataCatalog.get(args.dataset or cfg.DATASETS.TEST[0])
    records = DatasetCatalog.get(args.dataset) if args.dataset else input_records(args.input, args.gt)
    if not records:
        sys.exit(f"Dataset '{args.dataset}' has no images")
    class_names, colors = list(meta.stuff_classes), meta.stuff_colors
    ignore_label = getattr(meta, "ignore_label", IGNORE_LABEL)
    chosen = class_ids_from_names(args.classes, class_names) if args.classes else None
    num_figures = args.num if args.num is not None else (len(records) if args.input else 4)
    labelled = [r for r in records if "sem_seg_file_name" in r]
    if args.measure and not labelled:
        sys.exit("--measure needs ground truth: use --dataset, or --input with --gt")
    todo = records if args.measure else records[:num_figures]

    predictor = StructTokenPredictor(cfg)  # its model, and the evaluation's preprocessing
    if not hasattr(predictor.model, "sem_seg_head") or not hasattr(predictor.model.sem_seg_head, "layers"):
        sys.exit(f"{cfg.MODEL.META_ARCHITECTURE} / {cfg.MODEL.SEM_SEG_HEAD.NAME}: not a StructToken model")
    meters = {}
    written = []
    for i, record in enumerate(todo):
        image = read_image_file(record["file_name"], format="RGB")
        inputs = predictor.model_input(image[:, :, ::-1])
        result = predict_token_maps(predictor.model, inputs, with_feature=args.measure)
        if not meters:
            meters = {name: ConcentrationMeter(result.names, class_names, ignore_label, name) for name in MEASURES}
            readout = StageReadout(["F"] + result.names, class_names, ignore_label)
        gt = read_sem_seg_label(record, len(class_names), ignore_label) if "sem_seg_file_name" in record else None
        fractions = None  # of the figure: the positive-mass shares
        if gt is not None:
            shares = {name: meter.add(result.maps, torch.as_tensor(gt)) for name, meter in meters.items()}
            fractions = shares["positive mass"].numpy()
            if args.measure:
                readout.add([result.feature, *result.maps], torch.as_tensor(gt))
        if i < num_figures:
            pred = result.logits.argmax(0).numpy()
            ids = chosen or shown_classes(gt if gt is not None else pred, ignore_label=ignore_label)
            fig = token_map_figure(image, pred, result.maps.numpy(), result.names, ids, class_names, colors, gt,
                                   fractions, title=os.path.basename(record["file_name"]), scale=args.scale)
            name = os.path.splitext(os.path.basename(record["file_name"]))[0] + "_tokens.png"
            written.append(save_new_file(os.path.join(args.output, name), lambda tmp: fig.savefig(tmp, dpi=100)))
            print(f"Token maps written to {written[-1]}", flush=True)
        if (i + 1) % 50 == 0 or i + 1 == len(todo):
            print(f"{i + 1}/{len(todo)} images", file=sys.stderr, flush=True)
    if args.measure:
        tables = {name: meter.summary() for name, meter in meters.items()}
        stages = next(iter(meters.values())).stage_names
        print(f"\nEach class map against the class's ground-truth region, per stage ({len(labelled)} images of "
              f"{args.dataset or 'the inputs'}, {cfg.MODEL.WEIGHTS}). positive mass: the share of the map's "
              f"positive mass inside the region; centred: the same for the map minus its mean; area: the region's "
              f"share of the image, what an even map scores on those two. separation: the chance that a region "
              f"pixel has a higher value than a pixel outside (0.5: not told apart, 1: perfectly).")
        for name, rows in tables.items():
            print(f"\n{name}:\n{format_concentration_table(rows, stages)}")
        paths = write_concentration(tables, stages, os.path.join(args.output, "token_concentration"))
        if len(labelled) >= 2:
            print(f"readout: fitting a linear classifier per stage ({', '.join(readout.stage_names)}) on "
                  f"{readout.pixels_per_image} pixels of each of {(len(labelled) + 1) // 2} images",
                  file=sys.stderr, flush=True)
            readout_rows = readout.summary()
            print(f"\nreadout: the IoU of each class read, pixel by pixel, from the stage's channels (F: the "
                  f"backbone's feature) by a linear classifier fitted on half the images, scored on the other "
                  f"{readout_rows[-1]['images']}; area: the class's pixel share there.\n"
                  f"{format_concentration_table(readout_rows, readout.stage_names)}")
            paths += write_concentration({"readout": readout_rows}, readout.stage_names,
                                         os.path.join(args.output, "stage_readout"))
        else:
            print("\nreadout: skipped, it needs 2 labelled images or more (one to fit the classifier, one to score it)")
        print(f"\nWritten to {', '.join(paths)}")
    return written


if __name__ == "__main__":
    main()
