"""Figures: structure-token maps (paper Fig. 4) and their concentration, training curves."""
from .metrics_curves import load_metrics, metrics_figure, plot_metrics
from .stage_readout import StageReadout, class_ious, fit_linear_readout
from .token_concentration import (
    MEASURES,
    ConcentrationMeter,
    area_fractions,
    format_concentration_table,
    inside_fractions,
    region_separation,
    write_concentration,
)
from .token_figure import COLOUR_SCALES, token_map_figure
from .token_maps import TokenMapRecorder, TokenMaps, predict_token_maps, stage_names

__all__ = [
    "COLOUR_SCALES",
    "MEASURES",
    "ConcentrationMeter",
    "StageReadout",
    "TokenMapRecorder",
    "TokenMaps",
    "area_fractions",
    "class_ious",
    "fit_linear_readout",
    "format_concentration_table",
    "inside_fractions",
    "region_separation",
    "load_metrics",
    "metrics_figure",
    "plot_metrics",
    "predict_token_maps",
    "stage_names",
    "token_map_figure",
    "write_concentration",
]
