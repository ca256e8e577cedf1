"""Configs are read one way by every tool: a bad key or value is one line that names the file or
the override and the key, and suggests the nearest keys; a valid config is Detectron2's own merge."""
import subprocess
import sys

import pytest

import structtoken_d2  # noqa: F401
from detectron2.config import get_cfg
from structtoken_d2 import add_structtoken_config
from structtoken_d2.config_loading import ConfigError, load_config
from tiny_runs import REPO, SHAPES_CONFIG, load_tool


def test_a_valid_config_is_detectron2s_merge_of_file_and_overrides():
    opts = ["SOLVER.BASE_LR", "0.5", "MODEL.STRUCTTOKEN.VARIANT", "SSE", "INPUT.CROP.SIZE", "[64, 96]"]
    expected = add_structtoken_config(get_cfg())
    expected.merge_from_file(str(SHAPES_CONFIG))
    expected.merge_from_list(opts)
    cfg = load_config(str(SHAPES_CONFIG), opts)
    assert cfg.dump() == expected.dump()
    assert (cfg.SOLVER.BASE_LR, cfg.MODEL.STRUCTTOKEN.VARIANT, cfg.INPUT.CROP.SIZE) == (0.5, "SSE", [64, 96])


def test_a_misspelt_key_on_the_command_line_names_it_and_the_key_meant():
    with pytest.raises(ConfigError) as error:
        load_config(str(SHAPES_CONFIG), ["SOLVER.MAX_ITER", "10", "MODEL.STRUCTTOKEN.VARIANTS", "CSE"])
    assert str(error.value) == ("command line, MODEL.STRUCTTOKEN.VARIANTS CSE: MODEL.STRUCTTOKEN.VARIANTS is not a "
                                "config key; did you mean MODEL.STRUCTTOKEN.VARIANT?")


def test_a_key_like_none_gets_no_suggestion():
    with pytest.raises(ConfigError, match=r"^command line, ZZZ 1: ZZZ is not a config key; the keys are "
                                          r"Detectron2's and those of structtoken_d2/config.py$"):
        load_config(str(SHAPES_CONFIG), ["ZZZ", "1"])


@pytest.mark.parametrize("key, value, message", [
    ("SOLVER.BASE_LR", "fast", "SOLVER.BASE_LR takes a number (its value before: 0.0014); got fast, a string"),
    ("SOLVER.IMS_PER_BATCH", "2.5", "SOLVER.IMS_PER_BATCH takes an integer (its value before: 16); got 2.5, a number"),
    ("MODEL.STRUCTTOKEN", "CSE", "MODEL.STRUCTTOKEN is a group of keys, not a value: set its keys "
                                 "(MODEL.STRUCTTOKEN.NAME VALUE)"),
])
def test_a_value_of_the_wrong_type_says_what_the_key_takes(key, value, message):
    with pytest.raises(ConfigError) as error:
        load_config(str(SHAPES_CONFIG), [key, value])
    assert str(error.value) == f"command line, {key} {value}: {message}"


def test_overrides_must_come_in_pairs():
    with pytest.raises(ConfigError, match="KEY VALUE pairs; got 3 words: SOLVER.BASE_LR 0.1 SOLVER.MAX_ITER$"):
        load_config(str(SHAPES_CONFIG), ["SOLVER.BASE_LR", "0.1", "SOLVER.MAX_ITER"])


def test_errors_in_a_file_name_the_file_of_the_base_chain_that_has_the_key(tmp_path):
    (tmp_path / "bases").mkdir()
    base = tmp_path / "bases" / "base.yaml"
    child = tmp_path / "child.yaml"
    child.write_text("_BASE_: bases/base.yaml\nSOLVER:\n  MAX_ITER: 10\n")
    base.write_text("SOLVER:\n  BASE_LRR: 0.1\n")
    with pytest.raises(ConfigError) as error:
        load_config(str(child))
    assert str(error.value) == f"{base}: SOLVER.BASE_LRR is not a config key; did you mean SOLVER.BASE_LR?"

    base.write_text("SOLVER:\n  BASE_LR: 0.1\n")
    child.write_text("_BASE_: bases/base.yaml\nSOLVER:\n  MAX_ITER: ten\n")
    with pytest.raises(ConfigError) as error:
        load_config(str(child))
    assert str(error.value).startswith(f"{child}: SOLVER.MAX_ITER takes an integer")

    with pytest.raises(ConfigError, match=r"nope.yaml: no such config file"):
        load_config(str(tmp_path / "nope.yaml"))


def test_train_net_stops_before_starting_with_one_line_and_writes_nothing(tmp_path):
    output = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "tools/train_net.py", "--config-file", str(SHAPES_CONFIG), "--num-gpus", "2",
         "SOLVER.BASE_LRR", "0.1", "OUTPUT_DIR", str(output)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.rstrip().splitlines()[-1] == (
        "train_net.py: error: command line, SOLVER.BASE_LRR 0.1: SOLVER.BASE_LRR is not a config key; "
        "did you mean SOLVER.BASE_LR?")
    assert not output.exists()


@pytest.mark.parametrize("text, message", [
    ("_BASE_: missing.yaml\n", r"c.yaml: cannot read .*missing.yaml: No such file or directory$"),
    ("SOLVER: [1\n", r"c.yaml: not valid YAML: while parsing a flow sequence"),
    ("- SOLVER\n", r"c.yaml: not a config: its YAML \(or that of a _BASE_ file\) is not a mapping of keys$"),
])
def test_an_unreadable_file_is_named(tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(str(tmp_path / "c.yaml"))


def test_overrides_after_a_list_option_are_overrides_not_its_values():
    """`--classes car door MODEL.WEIGHTS w.pth`: argparse gives the overrides to --classes."""
    visualize_tokens, demo = load_tool("visualize_tokens"), load_tool("demo")
    args = visualize_tokens.parse_args(["--config-file", "c.yaml", "--output", "out", "--input", "a.png", "MODEL.png",
                                        "--classes", "car", "door", "MODEL.WEIGHTS", "w.pth", "SOLVER.BASE_LR", "1"])
    assert (args.input, args.classes) == (["a.png", "MODEL.png"], ["car", "door"])
    assert args.opts == ["MODEL.WEIGHTS", "w.pth", "SOLVER.BASE_LR", "1"]
    args = demo.parse_args(["--config-file", "c.yaml", "--output", "out", "--input", "a.png", "b.png",
                            "MODEL.WEIGHTS", "w.pth"])
    assert (args.input, args.opts) == (["a.png", "b.png"], ["MODEL.WEIGHTS", "w.pth"])
    args = demo.parse_args(["--config-file", "c.yaml", "--input", "a.png", "--output", "out", "MODEL.WEIGHTS", "w.pth"])
    assert (args.input, args.opts) == (["a.png"], ["MODEL.WEIGHTS", "w.pth"])
    with pytest.raises(ConfigError, match=r"^--classes MODEL.WEIGHTS: --classes needs a value before the config "):
        visualize_tokens.parse_args(["--config-file", "c.yaml", "--output", "out", "--input", "a.png", "--classes",
                                     "MODEL.WEIGHTS", "w.pth"])
