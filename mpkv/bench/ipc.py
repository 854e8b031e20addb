"""`mpkv bench ipc`: the mpkv SPSC ring side by side with the usual Python IPC, in one run, as a ratio table.

Measured, each with its own child process (start method ``spawn``):

- round trip p50/p99, 64 B and 4 KiB: the parent sends, an echo child sends it back, one sample per trip;
- one-way throughput: a child puts 64-B messages one by one, the parent gets them one by one and checks the
  sequence number in each; msgs/s from the first message to the last, at the consumer;
- the ring's batched paths: ``put_records``/``get_records_into`` of (4096, 64) uint8 arrays, and
  ``put_many``/``get_many`` of 256 x 64 B;
- the CPU time of a reader blocked on an empty ring.

Baselines: ``multiprocessing.Queue`` (two queues), ``multiprocessing.Pipe`` (duplex), ``faster_fifo.Queue``
(two queues) and ZeroMQ PAIR sockets over ``ipc://``; the last two are bench extras, a row says "not
installed" when they are missing. Every wait is bounded by ``TIMEOUT_S``; every child is joined or
terminated and every shared-memory name and socket file removed, also on error or Ctrl-C.

Here: the run (each transport, then the ring's extras; a failed measurement is recorded and the run goes on).
The measurements and their child processes are ``ipc_measure``; the table, targets and JSON are ``ipc_report``;
the transports themselves are ``links``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from mpkv.bench.ipc_measure import measure_idle, measure_many, measure_records, measure_rtt, measure_stream
from mpkv.bench.ipc_report import Background, Extras, Row, Run, cpu_now, header, machine, report
from mpkv.bench.links import (
    FULL,
    QUICK,
    TIMEOUT_S,
    TRANSPORTS,
    Params,
    Transport,
)


# -- the run ------------------------------------------------------------------------------------------------
def _progress(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


def _attempt(what: str, fn: Callable[[], Any], errors: list[str]) -> Any:
    """Run one measurement; a failure (not Ctrl-C) is recorded and the run goes on with the others."""
    _progress(what)
    try:
        return fn()
    except Exception as e:
        timed_out = type(e).__name__ in ("Empty", "Again")  # queue.Empty (both queues), zmq.Again
        why = f"nothing received within {TIMEOUT_S:g} s" if timed_out else str(e)
        errors.append(f"{what}: {type(e).__name__}: {why}")
        return None


def run_transport(t: Transport, p: Params) -> Row:
    row = Row(t.name)
    if (why := t.missing()) is not None:
        row.status = why
        return row
    errors: list[str] = []
    row.rtt = _attempt(f"{t.name}: round trips", partial(measure_rtt, t, p), errors) or {}
    row.msgs_per_s = _attempt(f"{t.name}: one-way stream", partial(measure_stream, t, p), errors)
    if errors:
        row.status = "failed: " + "; ".join(e.removeprefix(f"{t.name}: ") for e in errors)
    return row


def run_extras(p: Params) -> Extras:
    ex = Extras()
    ex.records_per_s = _attempt("ring: put_records", partial(measure_records, p), ex.errors)
    ex.many_per_s = _attempt("ring: put_many / get_many", partial(measure_many, p), ex.errors)
    ex.idle = _attempt(f"ring: idle blocked reader, {p.idle_s:g} s", partial(measure_idle, p), ex.errors)
    return ex


def main(args: argparse.Namespace) -> int:
    quick = bool(getattr(args, "quick", False))
    p = QUICK if quick else FULL
    command = shlex.join(getattr(sys, "orig_argv", sys.argv))
    mach = machine()
    print("\n".join([*header(command, mach, p, quick), ""]), flush=True)
    t0, cpu0 = time.perf_counter(), cpu_now()
    rows = [run_transport(t, p) for t in TRANSPORTS]
    extras = run_extras(p)
    wall_s = time.perf_counter() - t0
    run = Run(command, mach, quick, p, rows, extras, wall_s, Background.since(cpu0, wall_s))
    print("\n".join(report(run)), flush=True)
    if getattr(args, "json", None):
        with open(args.json, "w") as f:
            json.dump(run.as_json(), f, indent=2)
            f.write("\n")
    return 1 if run.failed() else 0
