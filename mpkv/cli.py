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
    from mpkv.bench import ipc, lifecycle, pd

    runners: dict[str, Callable[[argparse.Namespace], int]] = {
        "pd": pd.main,
        "ipc": ipc.main,
        "rl": lifecycle.main,
        "swap": lifecycle.main,
    }
    return runners[args.what](args)


def _launch(args: argparse.Namespace) -> int:
    from mpkv.config import CacheConfig
    from mpkv.launcher import Launcher

    base = CacheConfig.from_json(open(args.config).read()) if args.config else CacheConfig()
    overrides = {k: v for k, v in vars(args).items() if k in base.__dataclass_fields__ and v is not None}
    cfg = CacheConfig(**(base.__dict__ | overrides))
    return Launcher(args.name, cfg, say=lambda line: print(line, flush=True)).run()


def _ctl(args: argparse.Namespace) -> int:
    import json

    from mpkv.controller import Controller

    with Controller(args.name, timeout_s=args.timeout) as ctl:
        if args.action == "status":
            st = ctl.status()
            if args.json:
                print(json.dumps(st, indent=2))
            else:
                print(
                    f"instance {st['instance']} run {st['run_id']}: command {st['command']['kind']}@"
                    f"{st['command']['epoch']}, weight version {st['weight_version']}, cleared {st['cleared']}, "
                    f"logs {st['config']['log_dir'] or '-'}"
                )
                for a in [st["launcher"], *st["actors"]]:
                    hb = "-" if a["heartbeat_age_s"] is None else f"{a['heartbeat_age_s']:.1f}s"
                    rank = "" if a["rank"] < 0 else f"r{a['rank']}"
                    wait = a.get("waiting_for", {"kind": "NONE"})
                    waits = {"NONE": "", "COMMAND": "idle"}.get(
                        wait["kind"], f"waits for {', '.join(wait.get('on', []))}"
                    )
                    print(
                        f"  {a['role']:9} {rank:3} pid {a['pid']:<8} {a['state'] + '@' + str(a['epoch']):12} "
                        f"heartbeat {hb:>6}  {'alive' if a['alive'] else 'DEAD ':5}  {waits:24} {a['error']}".rstrip()
                    )
            return 0
        if args.action == "clear":
            res = ctl.clear(device=not args.host_only, host=not args.device_only)
        elif args.action == "restore":
            res = ctl.restore(args.weight_version)
        else:
            res = getattr(ctl, args.action)()
        if args.json:
            print(json.dumps(res.__dict__))
        elif res.already:
            print(f"{args.name}: {res.message}")
        else:
            extra = ""
            if res.released_bytes:
                extra = (
                    f"; released {sum(res.released_bytes.values())} B (actors), /dev/shm -{res.shm_released_bytes} B"
                )
            print(
                f"{args.name}: {res.command.lower()} done at epoch {res.epoch} in {res.latency_s * 1e3:.1f} ms{extra}"
            )
        return 0


def _top(args: argparse.Namespace) -> int:
    from mpkv import top

    return top.main(args.rest)


def _demo(args: argparse.Namespace) -> int:
    from mpkv import demo

    return demo.main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mpkv", description="Multiprocess KV-cache runtime.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    c = sub.add_parser("cleanup", help="remove the shared-memory names of instances whose processes are all dead")
    c.add_argument("--dry-run", action="store_true", help="only print what would be removed")
    c.add_argument("--name", help="only this instance")
    c.set_defaults(func=_cleanup)

    lp = sub.add_parser("launch", help="start an instance; prints one line when ready; runs until stopped")
    lp.add_argument("--name", required=True)
    lp.add_argument("--tp", type=int)
    lp.add_argument("--backend", choices=["cpu", "cuda"])
    lp.add_argument("--config", help="a JSON file of CacheConfig fields; flags override it")
    for flag, typ in (
        ("layers", int),
        ("kv-heads", int),
        ("head-dim", int),
        ("block-size", int),
        ("dtype", str),
        ("device-blocks", int),
        ("host-blocks", int),
        ("weight-version", int),
        ("hidden", int),
        ("nixl-port", int),
    ):
        lp.add_argument(f"--{flag}", type=typ, dest=flag.replace("-", "_"))
    lp.add_argument("--pool-owner", choices=["worker", "transfer"], dest="pool_owner")
    lp.add_argument(
        "--role",
        choices=["mixed", "prefill", "decode"],
        dest="pd_role",
        help="PD disaggregation: a prefill instance ships KV into a decode instance's pool (default: mixed)",
    )
    lp.set_defaults(func=_launch)

    cp = sub.add_parser("ctl", help="control a running instance (the RL transaction)")
    cp.add_argument("name")
    cp.add_argument("action", choices=["status", "pause", "resume", "clear", "restore", "shutdown"])
    cp.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for every actor (default 60)")
    cp.add_argument("--json", action="store_true")
    cp.add_argument("--weight-version", type=int, help="restore: the new weight version (default: unchanged)")
    cp.add_argument("--device-only", action="store_true", help="clear: only the device tier")
    cp.add_argument("--host-only", action="store_true", help="clear: only the host tier")
    cp.set_defaults(func=_ctl)

    dp = sub.add_parser("demo", help="the main job: a TP=2 instance, prefills, swaps, RL cycles, every byte verified")
    dp.add_argument("--cycles", type=int, default=20)
    dp.add_argument("--tp", type=int, default=2)
    dp.add_argument("--quick", action="store_true", help="a short run")
    dp.set_defaults(func=_demo)

    tp = sub.add_parser("top", help="mpkv-top: watch every instance live (mpkv top --help for its options)")
    tp.add_argument("rest", nargs=argparse.REMAINDER)
    tp.set_defaults(func=_top)

    b = sub.add_parser("bench", help="benchmarks, side by side with baselines, as ratio tables")
    b.add_argument(
        "what",
        choices=["ipc", "rl", "swap", "pd"],
        help="ipc: ring latency/throughput vs mp.Queue, Pipe, faster-fifo, ZeroMQ; rl: clear/restore cycle vs its "
        "floor at TP=1/2/4; swap: swap bytes/s vs memcpy; pd: prefill->decode time to KV-ready, layer-wise vs "
        "prefill alone vs send-after-prefill",
    )
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
