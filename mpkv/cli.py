"""The `mpkv` command: one subcommand per job, dispatched by table."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from mpkv.errors import MpkvError


def _cleanup(args: argparse.Namespace) -> int:
    from mpkv.shm.cleanup import cleanup

    report = cleanup(dry_run=args.dry_run, instance=args.name)
    for line in report.lines(args.dry_run):
        print(line)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from mpkv.bench import ipc

    runners: dict[str, Callable[[argparse.Namespace], int]] = {"ipc": ipc.main}
    return runners[args.what](args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mpkv", description="Multiprocess KV-cache runtime.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    c = sub.add_parser("cleanup", help="remove the shared-memory names of instances whose processes are all dead")
    c.add_argument("--dry-run", action="store_true", help="only print what would be removed")
    c.add_argument("--name", help="only this instance")
    c.set_defaults(func=_cleanup)

    b = sub.add_parser("bench", help="benchmarks, side by side with baselines, as ratio tables")
    b.add_argument("what", choices=["ipc"], help="ipc: ring latency/throughput vs mp.Queue, Pipe, faster-fifo, ZeroMQ")
    b.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run, not for the record)")
    b.add_argument("--json", metavar="FILE", help="also write the raw results as JSON")
    b.set_defaults(func=_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except MpkvError as e:
        print(f"mpkv: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
