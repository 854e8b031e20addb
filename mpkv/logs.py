"""One log format and one level for every mpkv process: the launcher and each actor (loguru).

A line is ``HH:MM:SS.mmm <who> <LEVEL> <message>``, who being ``launcher`` or ``<role>:r<rank>``: the time first, so
that the lines of several processes sort by time (mpkv-top merges the actors' files so), the process next, so that
a line says whose it is wherever it ends up (the launcher's stderr carries its actors' lines too).

The level comes from ``MPKV_LOG_LEVEL`` (``mpkv launch --log-level`` sets it for the launcher and the actors it
starts, which inherit the environment), default WARNING: what stderr shows. An actor's log file records INFO
whatever the level (or more, at DEBUG or TRACE): it is where mpkv-top and `ctl status` send a person to read the
handshake transitions that take or give back memory, and they must be there when something went wrong at the
default level. The other transitions (acknowledgements, drains, mappings: several per actor per RL step, ~30-50 us
of CPU each through loguru) are logged at DEBUG.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from loguru import logger

LEVEL_ENV = "MPKV_LOG_LEVEL"
DEFAULT_LEVEL = "WARNING"
LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")  # loguru's own, in order
FILE_LEVEL = "INFO"


def level() -> str:
    """The level MPKV_LOG_LEVEL names (any case; unset or empty: WARNING); a ValueError saying the choices if it
    names none."""
    raw = os.environ.get(LEVEL_ENV, "")
    name = raw.strip().upper() or DEFAULT_LEVEL
    if name not in LEVELS:
        raise ValueError(f"{LEVEL_ENV}={raw!r} is not a log level: use one of {', '.join(LEVELS)}")
    return name


def line_format(who: str) -> str:
    """The one format (loguru's syntax; it appends the traceback of a logged exception itself)."""
    return "{time:HH:mm:ss.SSS} " + who.replace("{", "{{").replace("}", "}}") + " {level} {message}"


def setup(who: str) -> None:
    """This process logs to stderr in the one format at the level of MPKV_LOG_LEVEL, and nowhere else (loguru's
    default handler, every level in its own format, is removed)."""
    chosen = level()  # checked before anything changes: a bad level leaves loguru as it was
    logger.remove()
    logger.add(sys.stderr, level=chosen, format=line_format(who))


def add_file(path: str, who: str, opener: Callable[[str, int], int]) -> None:
    """Also log to ``path`` (opened through ``opener``, rotated at 10 MB), in the one format, at INFO or at the
    chosen level where that is lower."""
    chosen = level()
    file_level = chosen if logger.level(chosen).no < logger.level(FILE_LEVEL).no else FILE_LEVEL
    logger.add(path, level=file_level, format=line_format(who), rotation="10 MB", opener=opener)
