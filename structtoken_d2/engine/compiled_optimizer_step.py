"""``MODEL.COMPILE`` for the optimizer step: the gradient clipping and the update as one
``torch.compile``-d function (on a small model, the eager step is mostly per-parameter op overhead:
9 ms of the main job's 67 ms training step on one CPU thread, 4 ms compiled).

A compiled step is not used when a parameter group's learning rate is exactly 0 (a run resumed at the
end of its schedule, or a warm-up from 0): dynamo traces AdamW with ``capturable=True``, whose update
divides by the step size ``lr / bias_correction1``, so at ``lr == 0`` every element whose second
moment is 0 (a gradient that was always 0 there) becomes NaN, where the eager update leaves the
parameter as it is (torch 2.14.1; ``tests/test_compile.py`` has the two-line case). Such steps run
eagerly; they change no parameter anyway, only AdamW's moments and step count, as in eager runs.
"""
import types

import torch


def compile_optimizer_step(optimizer: torch.optim.Optimizer, **compile_kwargs) -> torch.optim.Optimizer:
    """Replaces ``optimizer.step`` (clipping included, see :mod:`.gradient_clipping`) in place by
    ``torch.compile(optimizer.step, **compile_kwargs)``, except for steps at a learning rate of 0;
    returns ``optimizer``. Its class, ``state_dict`` and checkpoints are those of the eager optimizer.
    The learning rates stay Python floats: the first change of one recompiles once, with the rate as
    an input of the graph."""
    eager_step = optimizer.step
    compiled_step = torch.compile(eager_step, **compile_kwargs)

    def step(self, closure=None):
        if closure is not None:
            raise ValueError("the compiled optimizer step (MODEL.COMPILE) takes no closure")
        if any(group["lr"] == 0 for group in self.param_groups):
            return eager_step()
        return compiled_step()

    optimizer.step = types.MethodType(step, optimizer)  # a method: LR schedulers wrap optimizer.step.__func__
    return optimizer
