"""Errors in the user's input (config keys and values, data files, datasets, class counts, checkpoints) whose message says
everything: the command-line tools print them as one line and exit, without a traceback."""
import functools
import os
import sys

from detectron2.utils import comm
from structtoken_runtime import RuntimeModelError

from ..config_loading import ConfigError
from ..data import DataFileError
from ..data.datasets import DatasetNotFoundError
from ..export import ExportError
from ..modeling.checkpoint import (
    CheckpointMismatchError, ClassCountMismatchError, NoLoadableCheckpointError, WeightsNotFoundError,
)

USER_ERRORS = (ConfigError, DataFileError, DatasetNotFoundError, ClassCountMismatchError, CheckpointMismatchError,
               NoLoadableCheckpointError, WeightsNotFoundError, ExportError, RuntimeModelError)


def user_error_message(error: BaseException) -> str:
    """The error's message; for one re-raised by a DataLoader worker (whose message is "Caught ..."
    plus the worker's traceback), the original message, i.e. the traceback's last line."""
    text = str(error)
    if text.startswith("Caught ") and "Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


def exit_on_user_error(main):
    """Decorator of a tool's ``main``: a :data:`USER_ERRORS` exception exits with status 1 and
    ``<tool>: error: <message>`` on stderr instead of a traceback; in a job of several processes,
    ``<tool>: error (rank <r> of <n>): <message>``."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except USER_ERRORS as e:
            world_size = comm.get_world_size()
            where = f" (rank {comm.get_rank()} of {world_size})" if world_size > 1 else ""
            sys.exit(f"{os.path.basename(sys.argv[0])}: error{where}: {user_error_message(e)}")

    return wrapper
