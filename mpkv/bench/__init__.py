"""Benchmarks behind `mpkv bench`: each compares side by side in one run and reports ratios."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from mpkv import naming
from mpkv.bench.machine import machine_line as machine_line  # weights' import (the one accounting: machine.py)


def emit(lines: list[str], raw: dict[str, Any], json_path: str | None) -> None:
    """Print a benchmark's report, and write its raw results as JSON when asked (``--json FILE``)."""
    print("\n".join(lines))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(raw, f, indent=2, default=str)


def all_equal(raw: dict[str, Any]) -> int:
    """The exit code of a benchmark that checks its results in the run: 1 if any row's results differed."""
    return 0 if all(row["equal"] for row in raw["rows"]) else 1


@contextmanager
def scratch_dir(what: str) -> Iterator[str]:
    """A private directory (naming.private_scratch_dir) for a benchmark's files, removed at the end."""
    path = naming.private_scratch_dir(what)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
