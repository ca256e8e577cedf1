"""A training hook that draws the run's curves (``OUTPUT_DIR/curves.png``) when training ends."""
import logging

from detectron2.engine import HookBase

from ..visualization import plot_metrics


class MetricsPlotHook(HookBase):
    """After training, :func:`structtoken_d2.visualization.plot_metrics` of ``output_dir``.

    Register it after the writers (Detectron2's ``PeriodicWriter`` flushes ``metrics.json`` in its
    own ``after_train``) and on the main process only. A failure to plot is logged as a warning,
    never raised: the trained model matters more than its picture."""

    def __init__(self, output_dir: str):
        self._output_dir = output_dir

    def after_train(self):
        logger = logging.getLogger(__name__)
        try:
            path = plot_metrics(self._output_dir)
        except Exception as e:  # noqa: BLE001  (plotting must never fail a training run)
            logger.warning("Could not plot the training curves of %s: %s: %s", self._output_dir, type(e).__name__, e)
            return
        logger.info("Training curves written to %s", path)
