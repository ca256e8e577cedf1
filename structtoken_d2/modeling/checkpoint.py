"""Class-count and fit checks for checkpoints, and a Detectron2 checkpointer that applies them, saves
atomically and resumes from the newest checkpoint that loads.

Detectron2's (fvcore's) checkpointer drops parameters whose shapes differ from the model's, and
leaves those the checkpoint lacks at their initialisation, with only a warning: a checkpoint
trained for another dataset or with another config (width, depth, variant) would load
"successfully" into a partly random model. :class:`StructTokenCheckpointer` raises instead
(:class:`ClassCountMismatchError` for the class count, which ``model.load_state_dict`` also raises
through the head; :class:`CheckpointMismatchError` for anything else), unless it is asked to
fine-tune to another class count (``MODEL.STRUCTTOKEN.REINIT_CLASS_DEPENDENT_WEIGHTS``).
"""
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils import comm

from ..output_files import replace_file

TOKENS_KEY = "sem_seg_head.tokens"
HEAD_PREFIX = "sem_seg_head."
LAST_CHECKPOINT_TAG = "last_checkpoint"

logger = logging.getLogger(__name__)


class ClassCountMismatchError(ValueError):
    """A checkpoint or dataset has a different number of classes from MODEL.SEM_SEG_HEAD.NUM_CLASSES."""


class CheckpointMismatchError(ValueError):
    """A checkpoint whose tensors do not fit the model built from the config (other shapes, missing or
    extra tensors), beyond a class count that the checkpointer was told to re-initialise."""


class WeightsNotFoundError(FileNotFoundError):
    """``MODEL.WEIGHTS`` (or another checkpoint path) is empty or names no file, where one is needed."""


class NoLoadableCheckpointError(FileNotFoundError):
    """``--resume`` found a ``last_checkpoint`` tag but no checkpoint in the directory loads."""


def check_num_classes(tokens_shape: Sequence[int], num_classes: int, key: str = TOKENS_KEY) -> None:
    """Raise :class:`ClassCountMismatchError` unless the tokens ``[1, K, Hs, Ws]`` have K == num_classes."""
    if len(tokens_shape) != 4 or tokens_shape[1] != num_classes:
        found = tokens_shape[1] if len(tokens_shape) == 4 else "?"
        raise ClassCountMismatchError(
            f"checkpoint has {found} classes ({key} of shape {list(tokens_shape)}) but the model is built "
            f"for {num_classes} (MODEL.SEM_SEG_HEAD.NUM_CLASSES): use a checkpoint of this dataset, set "
            f"NUM_CLASSES to match, or fine-tune with MODEL.STRUCTTOKEN.REINIT_CLASS_DEPENDENT_WEIGHTS True"
        )


def check_trained_weights(weights: str, hint: str = "") -> None:
    """Raise :class:`WeightsNotFoundError` unless ``weights`` (``MODEL.WEIGHTS``, where a trained model
    is needed) names a file or a URL; ``hint`` ends the message."""
    if not weights or ("://" not in weights and not os.path.isfile(weights)):
        raise WeightsNotFoundError(f"MODEL.WEIGHTS {weights!r} is not a file: pass MODEL.WEIGHTS "
                                   f"path/to/model_final.pth (a trained model){hint}")


def check_fits(incompatible, path: str) -> None:
    """Raise :class:`CheckpointMismatchError` if fvcore's ``incompatible`` (``missing_keys``,
    ``unexpected_keys``, ``incorrect_shapes`` of loading ``path``) lists anything."""
    def some(items):
        return ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")

    problems = []
    if incompatible.incorrect_shapes:
        problems.append(f"{len(incompatible.incorrect_shapes)} tensor(s) of another shape (" + some(
            [f"{k}: {list(c)} in the checkpoint, {list(m)} in the model" for k, c, m in incompatible.incorrect_shapes])
            + ")")
    if incompatible.missing_keys:
        problems.append(f"{len(incompatible.missing_keys)} model tensor(s) missing from it ("
                        f"{some(incompatible.missing_keys)})")
    if incompatible.unexpected_keys:
        problems.append(f"{len(incompatible.unexpected_keys)} tensor(s) the model does not have ("
                        f"{some(incompatible.unexpected_keys)})")
    if problems:
        raise CheckpointMismatchError(
            f"{path} does not fit the model of this config: {'; '.join(problems)}. Use the config it was trained "
            f"with (training saves it as config.yaml in its OUTPUT_DIR); a backbone-only file goes in "
            f"MODEL.VIT.WEIGHTS")


def _short_reason(error: Exception) -> str:
    """``"<ErrorType>: <first sentence of the message>"``, at most ~100 characters."""
    text = str(error).split(". ")[0].splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text[:100]}"


def _unwrap(model):
    return getattr(model, "module", model)  # DistributedDataParallel


class StructTokenCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that

    - refuses a checkpoint whose class count differs from the model's, or, with
      ``reinit_class_dependent``, leaves every head tensor whose shape differs because of it at
      its fresh initialisation, with a warning listing them;
    - writes checkpoints and the ``last_checkpoint`` tag atomically (temporary file + rename), to
      local paths only (``save_dir`` is not resolved through fvcore's ``path_manager``);
    - on resume, when ``last_checkpoint`` names a missing or unreadable (truncated) file, falls
      back to the newest ``*.pth`` of ``save_dir`` that loads, and says which. The main process
      chooses the file and every process loads that one.
    """

    def __init__(self, model, save_dir: str = "", *, reinit_class_dependent: bool = False, **kwargs):
        """``reinit_class_dependent``: see ``MODEL.STRUCTTOKEN.REINIT_CLASS_DEPENDENT_WEIGHTS``;
        other arguments as ``DetectionCheckpointer``."""
        super().__init__(model, save_dir, **kwargs)
        self.reinit_class_dependent = reinit_class_dependent
        self._preloaded: Optional[Tuple[str, Dict]] = None
        self._loading: Optional[str] = None  # the file load() is reading, for the fit check's message

    # ------------------------------------------------------------------ saving
    def save(self, name: str, **kwargs: Any) -> None:
        """As fvcore's ``Checkpointer.save`` (model, checkpointables and ``kwargs`` to
        ``save_dir/name.pth``, then the ``last_checkpoint`` tag), each file written atomically."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        replace_file(save_file, lambda tmp: torch.save(data, tmp))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                f.write(last_filename_basename)

        replace_file(os.path.join(self.save_dir, LAST_CHECKPOINT_TAG), write)

    # ---------------------------------------------------------------- resuming
    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        """As Detectron2's, but a ``last_checkpoint`` naming a missing or truncated file falls back
        to the newest checkpoint of ``save_dir`` that loads (:class:`NoLoadableCheckpointError`
        when none does). With several processes, the main process decides (it alone writes
        checkpoints): the others load the file it chose, or raise its error."""
        if not resume:
            return self.load(path, checkpointables=[])
        choice = self._resume_choice() if comm.is_main_process() else None
        checkpoint, error = comm.all_gather(choice)[0]  # the main process's choice, on every process
        if error is not None:
            raise NoLoadableCheckpointError(error)
        if checkpoint is None:  # nothing to resume: start from MODEL.WEIGHTS
            return self.load(path, checkpointables=[])
        return self.load(checkpoint)

    def _resume_choice(self) -> Tuple[Optional[str], Optional[str]]:
        """(the checkpoint to resume from, or None when ``save_dir`` has none, error message or None)."""
        if not self.has_checkpoint():
            return None, None
        try:
            return self._newest_loadable_checkpoint(), None
        except NoLoadableCheckpointError as e:
            return None, str(e)

    def _newest_loadable_checkpoint(self) -> str:
        """The file ``last_checkpoint`` names if it loads, else the newest (by modification time)
        other ``*.pth`` of ``save_dir`` that does; its contents are kept for :meth:`load`."""
        tagged = self.get_checkpoint_file()
        others = [p for p in self.get_all_checkpoint_files()  # not the tagged one, nor a temporary .file
                  if os.path.abspath(p) != os.path.abspath(tagged) and not os.path.basename(p).startswith(".")]
        others.sort(key=lambda p: (os.path.getmtime(p), p), reverse=True)
        failures: List[str] = []  # "<file>: <why it does not load>"
        for candidate in [tagged] + others:
            try:
                data = self._load_file(candidate)
            except Exception as e:  # missing, truncated or not a checkpoint: try the next one
                failures.append(f"{os.path.basename(candidate)}: {_short_reason(e)}")
                continue
            if candidate != tagged:
                logger.warning(
                    "%s names a checkpoint that cannot be loaded (%s): resuming from %s instead, the newest "
                    "checkpoint in %s that loads", LAST_CHECKPOINT_TAG, "; ".join(failures),
                    os.path.basename(candidate), self.save_dir,
                )
            self._preloaded = (candidate, data)
            return candidate
        raise NoLoadableCheckpointError(
            f"--resume: no checkpoint in {self.save_dir} can be loaded ({'; '.join(failures)}). Delete "
            f"{os.path.join(self.save_dir, LAST_CHECKPOINT_TAG)} to start afresh from MODEL.WEIGHTS, or set "
            f"OUTPUT_DIR to another run"
        )

    def _load_file(self, filename: str) -> Dict[str, Any]:
        if self._preloaded is not None and self._preloaded[0] == filename:
            data, self._preloaded = self._preloaded[1], None
            return data
        return super()._load_file(filename)

    # ----------------------------------------------------------------- loading
    def load(self, path: str, checkpointables: Optional[List[str]] = None) -> Dict[str, Any]:
        """fvcore's, refusing a path that is not a file (:class:`WeightsNotFoundError`; URLs are
        fvcore's to fetch) and a checkpoint that does not fit the model (:func:`check_fits`; the
        model is then partly loaded and must not be used)."""
        if path and "://" not in path and not os.path.isfile(path):
            raise WeightsNotFoundError(f"{path}: no such checkpoint file")
        self._loading = path
        return super().load(path, checkpointables)

    def _load_model(self, checkpoint):
        incompatible = self._load_model_tensors(checkpoint)
        check_fits(incompatible, self._loading or "the checkpoint")
        return incompatible

    def _load_model_tensors(self, checkpoint):
        """fvcore's, after the class-count check; when fine-tuning to another class count, the head
        tensors fvcore leaves out for their shape are listed in one warning (instead of fvcore's
        warning per tensor and its "not found in the checkpoint" list)."""
        head = getattr(_unwrap(self.model), "sem_seg_head", None)
        state = checkpoint.get("model", {})
        key = next((k for k in (TOKENS_KEY, "module." + TOKENS_KEY) if k in state), None)
        if head is None or key is None:
            return super()._load_model(checkpoint)
        shape = tuple(state[key].shape)
        checkpoint_classes = shape[1] if len(shape) == 4 else None
        if not self.reinit_class_dependent or checkpoint_classes == head.num_classes:
            check_num_classes(shape, head.num_classes, key)
            return super()._load_model(checkpoint)
        incompatible = super()._load_model(checkpoint)  # leaves out the tensors of another shape
        reinitialised = sorted(k for k, _, _ in incompatible.incorrect_shapes if k.startswith(HEAD_PREFIX))
        logger.warning(
            "Fine-tuning from %s to %d classes (MODEL.STRUCTTOKEN.REINIT_CLASS_DEPENDENT_WEIGHTS): these %d "
            "class-dependent tensors of the checkpoint are not loaded and keep their fresh initialisation: %s",
            checkpoint_classes, head.num_classes, len(reinitialised), ", ".join(reinitialised),
        )
        return incompatible._replace(
            missing_keys=[k for k in incompatible.missing_keys if k not in reinitialised],
            incorrect_shapes=[s for s in incompatible.incorrect_shapes if s[0] not in reinitialised],
        )
