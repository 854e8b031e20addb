"""The `mpkv` command: one subcommand per job, dispatched by table."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

from mpkv import logs
from mpkv.config import DTYPE_BYTES, FIELDS, CacheConfig, check_value, resolve_model, valid_range
from mpkv.errors import BadName, MpkvError
from mpkv.naming import check_instance


class UsageError(MpkvError, ValueError):
    """A flag or a config value the command cannot use; nothing was started or written."""


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every flag's help ends with its default, unless the help names it already (flags whose default comes from
    CacheConfig or the config file say so in their own words)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """Every usage error is one line on stderr, ``mpkv: [subcommand: ]what (see ... --help)``, exit 2: as every
    other error of the command is one ``mpkv: ...`` line."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        sub = self.prog.partition(" ")[2]  # "mpkv launch" -> "launch"
        self.exit(2, f"mpkv: {sub + ': ' if sub else ''}{message} (see {self.prog} --help)\n")


# Flag types: argparse says "argument --x: " and the ArgumentTypeError's text, "must be <range>, got '<text>'".
def config_flag(field: str) -> Callable[[str], int]:
    """The type of an integer flag that sets a CacheConfig field: checked against the field's own range
    (mpkv.config), so that the flag and the config file accept the same values and say the same range."""

    def convert(text: str) -> int:
        try:
            value = int(text)
            check_value(field, value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {valid_range(field)}, got {text!r}") from None
        return value

    return convert


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return v


def seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not 0 < v < math.inf:  # also refuses nan: every wait is bounded, and a deadline in the past is a typo
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return v


def instance_name(text: str) -> str:
    try:
        return check_instance(text)
    except BadName as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _cleanup(args: argparse.Namespace) -> int:
    from mpkv.shm.cleanup import cleanup, cleanup_log_dirs

    report = cleanup(dry_run=args.dry_run, instance=args.name)
    cleanup_log_dirs(report, dry_run=args.dry_run, instance=args.name)
    for line in report.lines(args.dry_run):
        print(line)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from mpkv.bench import gpu, ipc, lifecycle, model, pd, plot, weights

    if args.plot and (why := plot.missing(args.what)):  # before the benchmark runs, not after minutes of it
        raise UsageError(f"bench {args.what}: {why}")
    runners: dict[str, Callable[[argparse.Namespace], int]] = {
        "model": model.main,
        "pd": pd.main,
        "ipc": ipc.main,
        "rl": lifecycle.main,
        "swap": lifecycle.main,
        "weights": weights.main,
        "gpu": gpu.main,
    }
    return runners[args.what](args)


def _launch(args: argparse.Namespace) -> int:
    try:
        if not args.log_level:  # the flag's value is one of the levels (argparse choices); the environment's may not be
            logs.level()
        cfg = _launch_config(args)
    except ValueError as e:
        raise UsageError(f"launch {args.name}: {e}") from None
    if args.log_level:  # set once the checks passed; the actors inherit the environment: one level for all
        os.environ[logs.LEVEL_ENV] = args.log_level
    from mpkv.launcher import Launcher  # after the checks: a usage error is said at once, before torch is imported

    if args.json:  # stdout carries the ready record alone, for a program to parse; everything else is said on stderr
        return Launcher(
            args.name,
            cfg,
            say=lambda line: print(line, file=sys.stderr, flush=True),
            on_ready=lambda record: print(json.dumps(record), flush=True),
        ).run()
    return Launcher(args.name, cfg, say=lambda line: print(line, flush=True)).run()


FLAG_OF = {"pd_role": "--role"}
GPU_GROUPS = (
    "tests",
    "pool",
    "pd",
    "model",
    "graph",
)  # mpkv bench gpu --only (mpkv.bench.gpu.run_all)  # the launch flags not spelled as their field


def _launch_config(args: argparse.Namespace) -> CacheConfig:
    """The config file's fields, overridden by the flags given. A bad value is named as the user wrote it: the
    flag, or the file's field (one the flags did not override)."""
    from_file = _config_file(args.config) if args.config else {}
    flags = {f: v for f, v in vars(args).items() if f in FIELDS and v is not None}

    def label(field: str) -> str:
        if field in from_file and field not in flags:
            return f"{field!r} in {args.config}"
        return FLAG_OF.get(field, "--" + field.replace("_", "-"))

    return CacheConfig.from_fields(resolve_model(from_file | flags, label), label)


def _config_file(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the config file {path}: {e}") from None
    try:
        fields = json.loads(text)
    except ValueError as e:
        raise ValueError(f"the config file {path} is not JSON: {e}") from None
    if not isinstance(fields, dict):
        raise ValueError(f"the config file {path} must hold a JSON object of CacheConfig fields")
    return fields


def _ctl(args: argparse.Namespace) -> int:
    from mpkv.controller import SLEEP_TAGS, Controller, StepResult

    for flag, value, actions in (
        ("--weight-version", args.weight_version is not None, ("restore", "update-weights", "wake-up")),
        ("--from", args.weights_from is not None, ("restore", "update-weights")),
        ("--device-only", args.device_only, ("clear",)),
        ("--host-only", args.host_only, ("clear",)),
        ("--weights", args.weights, ("clear",)),
        ("--tags", args.tags is not None, ("sleep",)),
    ):
        if value and args.action not in actions:
            raise UsageError(
                f"ctl {args.name} {args.action}: {flag} applies to {' and '.join(actions)} only; nothing was done"
            )
    if args.weights_from is not None and args.weight_version is None:
        raise UsageError(
            f"ctl {args.name} {args.action}: --from publishes new weights, which need a new --weight-version; "
            "nothing was done"
        )
    if args.action == "update-weights" and args.weights_from is None:
        raise UsageError(f"ctl {args.name} update-weights needs --from DIR and --weight-version N; nothing was done")
    with Controller(args.name, timeout_s=args.timeout) as ctl:
        if args.action == "status":
            # The record as JSON, or as report.status_lines (what mpkv-top shows too). The exit code is 1 when
            # the launcher or an actor is dead or FAILED, so that a script can test the instance's health without
            # parsing the status (printed in full either way); the culprits go to stderr.
            from mpkv import report

            st = ctl.status()
            print(report.to_json(st) if args.json else "\n".join(line.text for line in report.status_lines(st)))
            if sick := report.unhealthy(st):
                print(f"mpkv: instance {st.instance} is not healthy: {'; '.join(sick)}", file=sys.stderr)
            return 1 if sick else 0
        if args.action == "clear":
            res = ctl.clear(device=not args.host_only, host=not args.device_only, weights=args.weights)
        elif args.action == "restore":
            res = ctl.restore(args.weight_version, weights_from=args.weights_from)
        elif args.action == "update-weights":
            # Published (and checked) while the instance serves on; then the four steps. A failure names its step.
            t0 = time.perf_counter()
            pub = ctl.update_weights(args.weights_from, args.weight_version)
            ctl.pause(), ctl.clear(), ctl.restore(args.weight_version), ctl.resume()
            res = StepResult("UPDATE-WEIGHTS", ctl.status().command.epoch, latency_s=time.perf_counter() - t0)
            res.message = (
                f"serving weight version {ctl.weight_version} from {args.weights_from} ({pub.nbytes} B published in "
                f"{pub.seconds * 1e3:.1f} ms)"
            )
        elif args.action == "sleep":
            res = ctl.sleep(args.tags.split(",") if args.tags is not None else SLEEP_TAGS)
        elif args.action == "wake-up":
            res = ctl.wake_up(args.weight_version)
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
            if res.gpu_bytes:  # cuda: what NVML saw each actor hold before and after
                from mpkv.gpumem import fmt_bytes

                seen = [f"{who} {fmt_bytes(b)} -> {fmt_bytes(a)}" for who, (b, a) in res.gpu_bytes.items()]
                extra += f"; GPU memory (NVML): {', '.join(seen)}" + (f" ({res.gpu_note})" if res.gpu_note else "")
            if res.message:
                extra += f"; {res.message}"
            print(
                f"{args.name}: {res.command.lower()} done at epoch {res.epoch} in {res.latency_s * 1e3:.1f} ms{extra}"
            )
        return 0


def _top(args: argparse.Namespace) -> int:
    from mpkv import top

    return top.main(args.rest)


def token_ids(text: str) -> list[int]:
    """--prompt-ids 1,2,3: a comma-separated list of non-negative integers."""
    try:
        ids = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids like 1,2,3, got {text!r}") from None
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"token ids are integers >= 0, got {text!r}")
    return ids


def _generate(args: argparse.Namespace) -> int:
    from mpkv.client import Client

    with Client(args.name) as client:
        pre = Client(args.prefill_on) if args.prefill_on else None
        try:
            out = client.generate(
                args.prompt_ids, args.max_new_tokens, temperature=args.temperature, seed=args.seed, prefill_on=pre
            )
        finally:
            if pre is not None:
                pre.close()
    if args.json:
        prompts = [{"prompt_ids": p, "token_ids": o.tolist()} for p, o in zip(args.prompt_ids, out, strict=True)]
        print(json.dumps({"instance": args.name, "generated": prompts}))
    else:
        for p, o in zip(args.prompt_ids, out, strict=True):
            print(f"{','.join(map(str, p))} -> {','.join(map(str, o.tolist()))}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from mpkv import demo

    return demo.main(args)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mpkv")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from mpkv import __version__

        return __version__


def _from_config(field: str) -> str:
    """The help of a launch flag whose default is CacheConfig's (it is None to argparse: unset flags do not
    override the config file)."""
    value = getattr(CacheConfig(), field)
    shown = value.name.lower() if hasattr(value, "name") else value
    return f"(default: the config file's, else {shown})"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mpkv", description="Multiprocess KV-cache runtime.")
    p.add_argument("--version", action="version", version=f"mpkv {_version()}", help="print the version and exit")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    c = sub.add_parser(
        "cleanup", help="remove the shared-memory names and log directories of instances whose processes are all dead"
    )
    c.add_argument("--dry-run", action="store_true", help="only print what would be removed")
    c.add_argument("--name", type=instance_name, help="only this instance (default: every dead instance of this user)")
    c.set_defaults(func=_cleanup)

    lp = sub.add_parser("launch", help="start an instance; prints one line when ready; runs until stopped")
    lp.add_argument("--name", type=instance_name, required=True, help="the instance name (required; no default)")
    lp.add_argument("--tp", type=config_flag("tp"), help=_from_config("tp"))
    lp.add_argument("--backend", choices=["cpu", "cuda"], help=_from_config("backend"))
    lp.add_argument("--config", help="a JSON file of CacheConfig fields; flags override it (default: none)")
    for field in ("layers", "kv_heads", "head_dim", "block_size", "device_blocks", "host_blocks", "weight_version"):
        lp.add_argument(f"--{field.replace('_', '-')}", type=config_flag(field), dest=field, help=_from_config(field))
    lp.add_argument("--dtype", choices=list(DTYPE_BYTES), help=_from_config("dtype"))
    for field in ("hidden", "vocab", "nixl_port"):
        lp.add_argument(f"--{field.replace('_', '-')}", type=config_flag(field), dest=field, help=_from_config(field))
    lp.add_argument(
        "--model",
        help="the model the workers run: 'synthetic' (byte-exact checks), a Hugging Face checkpoint directory "
        "(config.json and *.safetensors; it sets --layers, --kv-heads, --head-dim, --vocab), or module:Class "
        + _from_config("model"),
    )
    lp.add_argument(
        "--stable-addresses",
        action="store_const",
        const=True,
        dest="stable_addresses",
        help="cuda: keep each process's device pool at one virtual address across clear and restore (CUDA virtual "
        "memory, built by tools/build-cuda), so captured CUDA graphs stay valid (default: off)",
    )
    lp.add_argument("--pool-owner", choices=["worker", "transfer"], dest="pool_owner", help=_from_config("pool_owner"))
    lp.add_argument(
        "--role",
        choices=["mixed", "prefill", "decode"],
        dest="pd_role",
        help="PD disaggregation: a prefill instance ships KV into a decode instance's pool " + _from_config("pd_role"),
    )
    lp.add_argument(
        "--json",
        action="store_true",
        help="print the ready line as one JSON object (instance, run, pids, log_dir, config) on stdout, and every "
        "other message on stderr (default: prose on stdout)",
    )
    lp.add_argument(
        "--log-level",
        type=str.upper,
        choices=logs.LEVELS,
        help="what the launcher and its actors log to stderr; the actors' log files record INFO too "
        f"(default: ${logs.LEVEL_ENV}, else {logs.DEFAULT_LEVEL})",
    )
    lp.set_defaults(func=_launch)

    cp = sub.add_parser("ctl", help="control a running instance (the RL transaction)")
    cp.add_argument("name", type=instance_name, help="the instance")
    cp.add_argument(
        "action",
        choices=["status", "pause", "resume", "clear", "restore", "shutdown", "update-weights", "sleep", "wake-up"],
        help="update-weights: pause, clear, publish --from DIR as --weight-version, restore, resume; sleep: pause "
        "and clear (--tags); wake-up: restore and resume",
    )
    cp.add_argument("--timeout", type=seconds, default=60.0, help="seconds to wait for every actor")
    cp.add_argument("--json", action="store_true", help="print the result as JSON")
    cp.add_argument(
        "--weight-version",
        type=config_flag("weight_version"),
        help="restore, wake-up: the weight version (default: the one served; another must be published); "
        "update-weights: the new version",
    )
    cp.add_argument(
        "--from",
        "--weights-from",
        dest="weights_from",
        metavar="DIR",
        help="update-weights, restore: a checkpoint directory of the same model to publish as --weight-version",
    )
    cp.add_argument("--weights", action="store_true", help="clear: the workers' weights too (restore reloads them)")
    cp.add_argument("--tags", help="sleep: what to free, of kv_cache,weights (default: both)")
    tier = cp.add_mutually_exclusive_group()
    tier.add_argument("--device-only", action="store_true", help="clear: only the device tier")
    tier.add_argument("--host-only", action="store_true", help="clear: only the host tier")
    cp.set_defaults(func=_ctl)

    gp = sub.add_parser("generate", help="generate tokens on a running instance: a quick check from the shell")
    gp.add_argument("--name", type=instance_name, required=True, help="the instance (required)")
    gp.add_argument(
        "--prompt-ids", type=token_ids, required=True, action="append", help="a prompt's token ids: 1,2,3 (repeat it)"
    )
    gp.add_argument("--max-new-tokens", type=positive_int, required=True, help="tokens to generate per prompt")
    gp.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default: 0)")
    gp.add_argument("--seed", type=int, help="the first prompt's sampling seed, +1 per prompt (default: fresh)")
    gp.add_argument("--prefill-on", type=instance_name, help="a decode instance: prefill on this prefill instance")
    gp.add_argument("--json", action="store_true", help="print one JSON object of the prompts and their tokens")
    gp.set_defaults(func=_generate)

    dp = sub.add_parser(
        "demo",
        help="the main job: TP=2 instances, prefills, swaps, RL cycles, every byte verified; a real Llama "
        "checkpoint prefilled on one instance, decoded on another, tokens checked against the reference",
    )
    dp.add_argument("--cycles", type=positive_int, default=20, help="RL cycles to run")
    dp.add_argument("--tp", type=positive_int, default=2, help="tensor-parallel ranks")
    dp.add_argument("--quick", action="store_true", help="a short run")
    dp.set_defaults(func=_demo)

    tp = sub.add_parser("top", help="mpkv-top: watch every instance live (mpkv top --help for its options)")
    tp.add_argument("rest", nargs=argparse.REMAINDER)
    tp.set_defaults(func=_top)

    b = sub.add_parser("bench", help="benchmarks, side by side with baselines, as ratio tables")
    b.add_argument(
        "what",
        choices=["ipc", "rl", "swap", "pd", "model", "weights", "gpu"],
        help="ipc: ring latency/throughput vs mp.Queue, Pipe, faster-fifo, ZeroMQ; rl: the handshake cycle vs its "
        "floor at TP=1-8, restore and clear vs the allocation floor by pool size; swap: swap bytes/s vs memcpy; "
        "pd: prefill->decode time to KV-ready, layer-wise vs "
        "prefill alone vs send-after-prefill; model: a Llama checkpoint's prefill and decode tokens/s through "
        "instances at TP=1/2 and prefill->decode vs transformers' generate; weights: publish and load of 50M/200M "
        "bf16 weights vs memcpy, and an RL step split into its parts; gpu: the cuda path on a real GPU as one table "
        "(tools/gpu-check)",
    )
    b.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run, not for the record)")
    b.add_argument("--json", metavar="FILE", help="also write the raw results as JSON (default: not written)")
    b.add_argument(
        "--plot",
        metavar="FILE",
        help="rl, swap, pd: also draw the curves as a PNG, with matplotlib: mpkv[bench] (default: not drawn)",
    )
    b.add_argument(
        "--only",
        metavar="CHECKS",
        help="gpu: only these groups of checks, comma-separated: " + ", ".join(GPU_GROUPS) + " (default: all)",
    )
    b.set_defaults(func=_bench)
    return p


def quiet_on_broken_pipe(run: Callable[[], int]) -> int:
    """Run a command whose output may go to a reader that leaves early (`| head -1`): stop quietly, as a Unix tool
    killed by SIGPIPE would, with its exit code 141 (128 + SIGPIPE). Python ignores SIGPIPE, so the lost reader
    shows as BrokenPipeError: on a write, or on the flush here (output is buffered into a pipe). Stdout then points
    at /dev/null, so the interpreter's own flush at exit does not raise it again. Teardown in ``finally`` blocks
    and context managers has run on the way out."""
    try:
        code = run()
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return quiet_on_broken_pipe(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args))
    except UsageError as e:  # a flag or config value refused before anything was started: a usage error, 2
        print(f"mpkv: {e}", file=sys.stderr)
        return 2
    except MpkvError as e:
        print(f"mpkv: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
