"""Training step under ``torch.autocast`` with a chosen dtype, on CUDA or CPU."""
import logging
import time

import torch
from detectron2.engine import SimpleTrainer

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_amp_dtype(name: str, device_type: str) -> torch.dtype:
    """``cfg.SOLVER.AMP.DTYPE`` as a torch dtype; bfloat16 on a GPU without it falls back to
    float16 (logged)."""
    if name not in _DTYPES:
        raise ValueError(f"SOLVER.AMP.DTYPE must be one of {sorted(_DTYPES)}, got {name!r}")
    if name == "bfloat16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        logging.getLogger(__name__).warning("This GPU does not support bfloat16: AMP uses float16")
        return torch.float16
    return _DTYPES[name]


class MixedPrecisionTrainer(SimpleTrainer):
    """Like Detectron2's ``AMPTrainer``, for any device and dtype: forward under
    ``torch.autocast(device_type, dtype)``; float16 on CUDA scales the loss with a GradScaler."""

    def __init__(self, model, data_loader, optimizer, device_type: str, dtype: torch.dtype):
        super().__init__(model, data_loader, optimizer)
        self.device_type, self.dtype = device_type, dtype
        use_scaler = dtype == torch.float16 and device_type == "cuda"
        self.grad_scaler = torch.amp.GradScaler("cuda") if use_scaler else None

    def run_step(self):
        assert self.model.training, "[MixedPrecisionTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        with torch.autocast(self.device_type, dtype=self.dtype):
            loss_dict = self.model(data)
            losses = sum(loss_dict.values())

        self.optimizer.zero_grad()
        if self.grad_scaler is None:
            losses.backward()
            self._write_metrics(loss_dict, data_time)
            self.optimizer.step()
        else:
            self.grad_scaler.scale(losses).backward()
            self._write_metrics(loss_dict, data_time)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()

    def state_dict(self):
        ret = super().state_dict()
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
