"""Reading a config as every tool does: Detectron2's defaults and ours (:mod:`structtoken_d2.config`),
then a YAML file (with its ``_BASE_`` chain), then command-line ``KEY VALUE`` overrides. A key that
does not exist or a value of the wrong type is a :class:`ConfigError` whose message names the file
(or the override) and the key, and suggests the nearest existing keys."""
import argparse
import difflib
import os
import re
from typing import Iterator, Optional, Sequence

import torch
import yaml
from detectron2.config import CfgNode, get_cfg

from .config import add_structtoken_config

_UNKNOWN_KEY = re.compile(r"Non-existent (?:config )?key: (\S+)")
_TYPE_MISMATCH = re.compile(
    r"Type mismatch \(<class '(?:[\w.]+\.)?(\w+)'> vs\. <class '(?:[\w.]+\.)?(\w+)'>\) with values \((.*) vs\. (.*)\) "
    r"for config key: (\S+)$", re.DOTALL)

_TYPE_NAMES = {"int": "an integer", "float": "a number", "str": "a string", "bool": "True or False",
               "list": "a list", "tuple": "a list", "NoneType": "None"}


class ConfigError(ValueError):
    """A config file or command-line override that cannot be applied; the message says which and why."""


def load_config(config_file: str, opts: Sequence[str] = ()) -> CfgNode:
    """The config of ``config_file`` with ``opts`` (``[KEY, VALUE, KEY, VALUE, ...]``, values as
    Detectron2 parses them) applied; not frozen. Raises :class:`ConfigError` for a missing file,
    an unknown key or a value of the wrong type, in the file, a file of its ``_BASE_`` chain, or
    ``opts``."""
    cfg = add_structtoken_config(get_cfg())
    if not os.path.isfile(config_file):
        raise ConfigError(f"{config_file}: no such config file (the project's are under configs/)")
    try:
        cfg.merge_from_file(config_file)
    except yaml.YAMLError as e:
        raise ConfigError(f"{config_file}: not valid YAML: {' '.join(str(e).split())}") from None
    except (AttributeError, TypeError):  # yacs got a list or a scalar where the keys should be
        raise ConfigError(f"{config_file}: not a config: its YAML (or that of a _BASE_ file) is not a mapping of "
                          "keys") from None
    except OSError as e:  # a file of the _BASE_ chain
        raise ConfigError(f"{config_file}: cannot read {e.filename}: {e.strerror}") from None
    except (KeyError, ValueError, AssertionError) as e:
        key = _key_of(e)
        where = (_file_setting(config_file, key) if key else None) or config_file
        raise ConfigError(f"{where}: {_explain(e, cfg)}") from None
    opts = list(opts)
    if len(opts) % 2:
        raise ConfigError(f"the command-line overrides must be KEY VALUE pairs; got {len(opts)} words: "
                          f"{' '.join(opts)}")
    for key, value in zip(opts[0::2], opts[1::2]):
        try:
            cfg.merge_from_list([key, value])
        except (KeyError, ValueError, AssertionError) as e:
            raise ConfigError(f"command line, {key} {value}: {_explain(e, cfg)}") from None
    return cfg


def use_cpu_without_gpu(cfg: CfgNode) -> bool:
    """Sets ``MODEL.DEVICE`` to ``cpu`` when it names a CUDA device and there is none; returns
    whether it did. ``cfg`` must not be frozen."""
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
        return True
    return False


def move_swallowed_overrides(args: argparse.Namespace, *names: str) -> argparse.Namespace:
    """An option of ``nargs="+"`` written just before the trailing ``KEY VALUE`` overrides takes them
    as values of its own (``--classes car door MODEL.WEIGHTS w.pth``). For each ``args.<name>``, the
    first word that is a config key (of Detectron2's defaults and ours) and the words after it move to
    the front of ``args.opts``; returns ``args``. Raises :class:`ConfigError` when no value is left."""
    keys = set(_all_keys(add_structtoken_config(get_cfg())))
    for name in names:
        values = getattr(args, name) or []
        first_key = next((i for i, word in enumerate(values) if word in keys), None)
        if first_key is None:
            continue
        if first_key == 0:
            option = "--" + name.replace("_", "-")
            raise ConfigError(f"{option} {values[0]}: {option} needs a value before the config overrides")
        setattr(args, name, values[:first_key])
        args.opts = values[first_key:] + list(args.opts)
    return args


def _message(error: BaseException) -> str:
    return str(error.args[0]) if error.args else str(error)


def _key_of(error: BaseException) -> Optional[str]:
    """The key yacs's ``error`` is about: an unknown one, or one given a value of the wrong type."""
    unknown, mismatch = _UNKNOWN_KEY.search(_message(error)), _TYPE_MISMATCH.match(_message(error))
    return unknown.group(1) if unknown else mismatch.group(5) if mismatch else None


def _explain(error: BaseException, cfg: CfgNode) -> str:
    """One sentence for yacs's error ``error`` about a key of ``cfg``."""
    message = _message(error)
    unknown = _UNKNOWN_KEY.search(message)
    if unknown:
        key = unknown.group(1)
        close = difflib.get_close_matches(key, list(_all_keys(cfg)), n=3, cutoff=0.85)
        hint = f"did you mean {' or '.join(close)}?" if close else \
            "the keys are Detectron2's and those of structtoken_d2/config.py"
        return f"{key} is not a config key; {hint}"
    mismatch = _TYPE_MISMATCH.match(message)
    if mismatch:
        expected, given, before, value, key = mismatch.groups()
        if expected == "CfgNode":
            return f"{key} is a group of keys, not a value: set its keys ({key}.NAME VALUE)"
        wanted = _TYPE_NAMES.get(expected, f"a {expected}")
        return f"{key} takes {wanted} (its value before: {before}); got {value}, {_TYPE_NAMES.get(given, given)}"
    return message


def _all_keys(node: CfgNode, prefix: str = "") -> Iterator[str]:
    for name, value in node.items():
        yield prefix + name
        if isinstance(value, CfgNode):
            yield from _all_keys(value, f"{prefix}{name}.")


def _file_setting(config_file: str, key: str) -> Optional[str]:
    """The file of ``config_file``'s ``_BASE_`` chain that sets ``key`` (the file itself first)."""
    path = config_file
    while path:
        try:
            with open(path) as f:
                document = yaml.safe_load(f)
        except (OSError, yaml.YAMLError):
            return None
        if not isinstance(document, dict):
            return None
        if _has_key(document, key):
            return path
        base = document.get("_BASE_")
        path = (base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)) if isinstance(base, str) \
            else None
    return None


def _has_key(document: dict, key: str) -> bool:
    *parents, last = key.split(".")
    for part in parents:
        document = document.get(part) if isinstance(document, dict) else None
    return isinstance(document, dict) and last in document
