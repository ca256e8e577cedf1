"""The paper's Fig. 4 for one image: each chosen class's structure-token map stage by stage."""
import math
from typing import Optional, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..evaluation.prediction_images import colorize, shown_classes

PANEL_INCHES = 1.7
COLOUR_SCALES = ("row", "map")


def token_map_figure(
    image: np.ndarray,
    pred: np.ndarray,
    maps: np.ndarray,
    stage_names: Sequence[str],
    class_ids: Sequence[int],
    class_names: Sequence[str],
    colors: Sequence[Sequence[int]],
    gt: Optional[np.ndarray] = None,
    fractions: Optional[np.ndarray] = None,
    title: str = "",
    scale: str = "row",
) -> Figure:
    """
    Top row: the image ``[H, W, 3]`` RGB uint8, the ground truth ``gt [H, W]`` (when given) and the
    prediction ``pred [H, W]``, with a legend of the classes they show. Below, one row per class
    of ``class_ids`` (labelled with its name): the maps ``maps [S, K, H, W]`` of the stages
    ``stage_names`` on a diverging colour scale symmetric around 0 (red positive, blue negative):
    ``scale`` "row", one scale per row, with its colour bar; "map", one per map (no colour bar),
    which shows the shape of maps far weaker than the row's strongest. ``fractions [S, K]`` (the
    inside fractions of :mod:`.token_concentration`), when given, are printed in each map's corner.
    """
    if scale not in COLOUR_SCALES:
        raise ValueError(f"colour scale {scale!r}; valid: {', '.join(COLOUR_SCALES)}")
    top = [("image", image)] + ([("ground truth", colorize(gt, colors))] if gt is not None else [])
    top.append(("prediction", colorize(pred, colors)))
    num_stages = len(stage_names)
    columns = max(num_stages, len(top) + 1)
    rows = 1 + len(class_ids)
    fig = Figure(figsize=(PANEL_INCHES * columns + 0.8, PANEL_INCHES * rows + (0.3 if title else 0)),
                 constrained_layout=True)
    grid = fig.add_gridspec(rows, columns + 1, width_ratios=[1] * columns + [0.08])
    for c, (label, picture) in enumerate(top):
        ax = fig.add_subplot(grid[0, c])
        ax.imshow(picture)
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    legend_ax = fig.add_subplot(grid[0, len(top)])
    legend_ax.axis("off")
    handles = [Patch(facecolor=np.asarray(colors[k]) / 255.0, edgecolor="0.5", label=class_names[k])
               for k in shown_classes(pred, gt)]
    legend_ax.legend(handles=handles, loc="center left", fontsize=8, frameon=False)
    for r, k in enumerate(class_ids, 1):
        row = maps[:, k]
        for s, stage in enumerate(stage_names):
            limit = float(np.abs(row if scale == "row" else row[s]).max()) or 1.0
            ax = fig.add_subplot(grid[r, s])
            shown = ax.imshow(row[s], cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 1:
                ax.set_title(stage, fontsize=9)
            if s == 0:
                ax.set_ylabel(class_names[k], fontsize=9)
            if fractions is not None and not math.isnan(fractions[s, k]):
                ax.text(0.03, 0.04, f"in {fractions[s, k]:.2f}", transform=ax.transAxes, fontsize=7,
                        bbox=dict(facecolor="white", alpha=0.7, linewidth=0, pad=1))
        if scale == "row":
            fig.colorbar(shown, cax=fig.add_subplot(grid[r, columns]))
    if title:
        fig.suptitle(title, fontsize=9)
    return fig
