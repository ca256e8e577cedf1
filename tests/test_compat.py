"""Detectron2 v0.6 compatibility shims (structtoken_d2/compat.py)."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import structtoken_d2  # noqa: F401  (applies the shims)
from structtoken_d2 import compat


DETECTRON2_SUBPACKAGES = ["layers", "data", "engine", "modeling", "checkpoint", "evaluation"]


def test_detectron2_subpackages_import_after_structtoken():
    # A fresh interpreter: the shims must be enough on their own, whatever this process imported.
    code = (
        "import importlib, structtoken_d2\n"
        f"for name in {DETECTRON2_SUBPACKAGES!r}:\n"
        "    try:\n"
        "        importlib.import_module('detectron2.' + name)\n"
        "    except Exception as e:\n"
        "        print(f'detectron2.{name}: {type(e).__name__}: {e}')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_no_jit_script_warning_from_imports_yet_a_users_own_still_warns():
    # Shim 4: fvcore and detectron2 call torch.jit.script at import; a fresh interpreter shows every warning.
    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as imports:\n"
        "    warnings.simplefilter('always')\n"
        "    import structtoken_d2, detectron2.modeling, detectron2.engine\n"
        "import torch\n"
        "with warnings.catch_warnings(record=True) as own:\n"
        "    warnings.simplefilter('always')\n"
        "    torch.jit.script(torch.nn.ReLU())\n"
        "jit = lambda records: sum('torch.jit.script' in str(w.message) for w in records)\n"
        "print(jit(imports), jit(own) > 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.split() == ["0", "True"], result.stdout + result.stderr


def test_missing_op_names_itself_and_the_fix():
    placeholder = compat._MissingExtension("detectron2._C")
    with pytest.raises(compat.MissingDetectron2Op, match=r"detectron2\._C\.nms_rotated .*compiled ops.*pip install"):
        placeholder.nms_rotated()


def test_ops_imported_by_detectron2_modules_raise_clear_error():
    from detectron2 import _C

    if not isinstance(_C, compat._MissingExtension):
        pytest.skip("a full detectron2 build with compiled ops is installed")
    from detectron2.evaluation import fast_eval_api
    from detectron2.layers import deform_conv

    # The modules that import detectron2._C at module level hold the placeholder, whose ops fail loudly.
    with pytest.raises(compat.MissingDetectron2Op, match="deform_conv_forward"):
        deform_conv._C.deform_conv_forward()
    with pytest.raises(compat.MissingDetectron2Op, match="COCOevalAccumulate"):
        fast_eval_api._C.COCOevalAccumulate({}, [])


def test_pillow_linear_alias_is_bilinear():
    assert Image.LINEAR == Image.BILINEAR


def test_no_global_numpy_aliases():
    assert "int" not in vars(np) and "float" not in vars(np)


def test_environment_table_builds_without_compiled_ops():
    # default_setup() logs detectron2's environment table, which queries detectron2._C.
    from detectron2.utils.collect_env import collect_env_info

    table = collect_env_info()
    assert "PyTorch" in table
    from detectron2 import _C

    if isinstance(_C, compat._MissingExtension):
        assert "not built (detectron2 installed Python-only)" in table
