"""Detectron2 v0.6 on current libraries: the few shims it needs, each applied only when needed.

Applied by ``import structtoken_d2``, before any ``detectron2`` submodule that needs them is
imported (so import ``structtoken_d2`` first). A full, current detectron2 build needs none of 1-3.

1. ``detectron2._C`` is absent when detectron2 was installed Python-only (the ``pb1-detectron2``
   sdist ships no C++ sources), yet ``detectron2.layers.deform_conv`` and
   ``detectron2.evaluation.fast_eval_api`` import it at module level. A placeholder module is put
   in its place; calling any of its ops raises :class:`MissingDetectron2Op`, which names the op
   and says how to get a full build. StructToken itself uses none of these ops. The three
   build-information queries of ``detectron2.utils.collect_env`` (compiler, CUDA version,
   ``has_cuda``) answer that no compiled ops were built, so ``default_setup`` still logs its table.
2. ``PIL.Image.LINEAR`` was removed in Pillow 10; ``detectron2.data.transforms`` uses it as a
   default argument. It is aliased to ``PIL.Image.BILINEAR`` (the same filter).
3. ``detectron2.evaluation.SemSegEvaluator`` uses ``np.int`` / ``np.float`` (removed in NumPy
   1.24). No global NumPy alias is added: structtoken-d2 evaluates with its own
   ``structtoken_d2.evaluation.SemSegEvaluator``, which does not touch v0.6's.
4. ``fvcore.nn.focal_loss`` and ``detectron2.modeling.box_regression`` script functions with
   ``torch.jit.script`` at import, which torch deprecates with a ``FutureWarning``: two warnings at
   the start of every tool, about code StructToken never calls. Both modules are imported here with
   that one warning ignored (:data:`SCRIPTING_AT_IMPORT`); the filter ends with the imports, so a
   user's own ``torch.jit.script`` still warns. (Current fvcore and detectron2 do this too.)
"""
import importlib.util
import sys
import types
import warnings

from PIL import Image

FULL_BUILD_HINT = (
    "install a full detectron2 build with its compiled ops, e.g. "
    "`pip install 'git+https://github.com/facebookresearch/detectron2.git'` "
    "(see docs/getting_started.md, 'Installing on a GPU machine')"
)


class MissingDetectron2Op(RuntimeError):
    """Raised when a compiled detectron2 op is called on a Python-only detectron2 install."""


class _MissingExtension(types.ModuleType):
    """Stand-in for ``detectron2._C``: every attribute is an op that raises when called, except the
    build-information queries, which say that nothing was built."""

    NOT_BUILT = "not built (detectron2 installed Python-only)"

    def get_compiler_version(self) -> str:
        return self.NOT_BUILT

    def get_cuda_version(self) -> str:
        return self.NOT_BUILT

    def has_cuda(self) -> bool:
        return False

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def missing_op(*args, **kwargs):
            raise MissingDetectron2Op(
                f"detectron2._C.{name} is not available: this detectron2 was installed without its "
                f"compiled ops. To use it, {FULL_BUILD_HINT}."
            )

        missing_op.__name__ = name
        return missing_op


def _detectron2_extension_missing() -> bool:
    if importlib.util.find_spec("detectron2") is None or "detectron2._C" in sys.modules:
        return False
    try:
        return importlib.util.find_spec("detectron2._C") is None
    except ImportError:
        return True


#: Modules that call ``torch.jit.script`` when imported (shim 4).
SCRIPTING_AT_IMPORT = ("fvcore.nn", "detectron2.modeling.box_regression")


def _import_without_jit_script_warning() -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        for name in SCRIPTING_AT_IMPORT:
            if name not in sys.modules and importlib.util.find_spec(name.split(".")[0]) is not None:
                importlib.import_module(name)


def apply() -> None:
    """Apply the shims that this environment needs; a no-op where none is needed."""
    if _detectron2_extension_missing():
        import detectron2

        placeholder = _MissingExtension("detectron2._C", "placeholder for detectron2's missing compiled ops")
        sys.modules["detectron2._C"] = placeholder
        detectron2._C = placeholder
    if not hasattr(Image, "LINEAR"):
        Image.LINEAR = Image.BILINEAR
    _import_without_jit_script_warning()
