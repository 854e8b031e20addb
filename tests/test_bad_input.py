"""Bad input against one live instance (tp=2, cpu): every input gives success or a clear error, never another
exception type, never a dead or FAILED actor; the instance still serves a prefill and an RL cycle afterwards.

The fuzz is derandomized (hypothesis replays the same examples every run); a failure prints the example."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import pathlib
import re
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from instances import back_to_serving, prefill_and_verify, shared_instance

from mpkv import cli
from mpkv.blocks import BadBlocks, BadRequest, BadTask
from mpkv.client import Client, TaskFailed, Ticket
from mpkv.config import CacheConfig
from mpkv.controller import Controller
from mpkv.errors import MpkvError
from mpkv.instance import CONTROL_COMMAND
from mpkv.protocol import (
    MAX_WEIGHT_VERSION,
    ROLES,
    ActorState,
    PdRole,
    PoolOwner,
    Prefill,
    Role,
    SwapIn,
    SwapOut,
    actor_slot,
)

CLEAR = (MpkvError, ValueError, TypeError)  # what a bad argument may raise: a diagnosis, nothing else

# Its tests share launched instances (module fixtures): under -n they run on one worker.
pytestmark = pytest.mark.xdist_group("bad_input")
FUZZ = settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None
)


@pytest.fixture(autouse=True)
def _serving_after(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    back_to_serving(request, "served")


@pytest.fixture(scope="module")
def served() -> Iterator[str]:
    """The one live instance of this module: each test leaves it serving; its SHUTDOWN at the end must go through."""
    with shared_instance(tp=2) as inst:
        yield inst.name


def _all_alive(client: Client) -> None:
    """Every actor of the instance is alive and not FAILED (a bad input must never take one down)."""
    for rank in range(client.cfg.tp):
        for role in ROLES:
            sig = client.inst.status.read(actor_slot(role, rank))
            assert sig.writer.alive() and sig.value != ActorState.FAILED, (
                f"{role.name.lower()} r{rank} is {sig.value.name}: {client.inst.read_error(actor_slot(role, rank))}"
            )


# -- values: a mix of good ones and every kind of bad one ---------------------------------------------------------
def _arrays(limit: int) -> st.SearchStrategy[object]:
    ints = st.integers(-(2**70), 2**70)
    small = st.integers(-2, limit + 2)
    dtypes = st.sampled_from([np.int8, np.int32, np.int64, np.uint64, np.float32, np.float64, np.bool_])
    return st.one_of(
        st.lists(st.integers(0, limit - 1), min_size=1, max_size=6, unique=True).map(np.array),  # good
        st.lists(small, max_size=6).map(np.array),
        st.tuples(st.lists(small, min_size=1, max_size=4), dtypes).map(lambda a: np.array(a[0]).astype(a[1])),
        st.lists(st.floats(allow_nan=True), max_size=4).map(np.array),
        st.lists(ints, max_size=3),
        st.lists(st.lists(small, min_size=1, max_size=2), min_size=1, max_size=3),  # 2-D or ragged
        st.lists(st.one_of(small, st.text(max_size=2), st.none()), max_size=3),
        st.sampled_from([None, 3, 2.5, "1,2", b"\x01\x02", {1: 2}, np.int64(1), np.array(1), object()]),
    )


def _requests() -> st.SearchStrategy[object]:
    return st.one_of(
        st.text(min_size=1, max_size=8),
        st.text(max_size=300),
        st.sampled_from([None, 123, b"req", ["r"], "\n", "a\x00b", "\ud800", "x" * 257]),
    )


FRESH = object()  # stands for a real ticket, made when the example runs (never while hypothesis draws)
_flags = st.one_of(st.booleans(), st.sampled_from([None, 0, 1, "yes", 2.0, np.bool_(True)]))
_timeouts = st.one_of(st.floats(0.5, 5), st.sampled_from([0, -1, float("nan"), float("inf"), "5", None, True]))


def _call(client: Client, op: tuple) -> None:
    """One public-API call; a ticket it returns is waited for (a task that fails is a clear outcome too)."""
    kind, *args = op
    try:
        if kind == "wait":
            ticket = client.read_blocks(np.array([0])) if args[0] is FRESH else args[0]
            client.wait(ticket, timeout_s=args[1])
            return
        ticket = getattr(client, kind)(*args)
    except CLEAR:
        return
    try:
        client.wait(ticket, timeout_s=60)
    except TaskFailed:
        pass


def test_bad_input_fuzz_leaves_the_instance_serving(served: str) -> None:
    with Client(served) as client:
        cfg = client.cfg
        dev, host = _arrays(cfg.device_blocks), _arrays(cfg.host_blocks)
        tokens = st.one_of(
            st.lists(st.integers(0, cfg.vocab - 1), min_size=1, max_size=3 * cfg.block_size).map(np.array),
            _arrays(cfg.vocab),
        )
        tickets = st.one_of(
            st.sampled_from([None, 7, "t", Ticket(Role.WORKER, 1, "forged"), Ticket(Role.MESSAGER, 1 << 40, "x")]),
            st.just(FRESH),
        )
        ops = st.one_of(
            st.tuples(st.just("prefill"), _requests(), tokens, dev),
            st.tuples(st.just("swap_out"), dev),
            st.tuples(st.just("swap_in"), host, dev, _flags),
            st.tuples(st.just("read_blocks"), dev, _flags),
            st.tuples(st.just("wait"), tickets, _timeouts),
        )

        @FUZZ
        @given(op=ops)
        def one(op: tuple) -> None:
            _call(client, op)
            _all_alive(client)

        one()
        _still_serves(served, client)


def _still_serves(instance: str, client: Client) -> None:
    """A prefill verifies byte for byte, and a whole RL cycle goes through the Controller (and in the end, the
    shared instance's SHUTDOWN)."""
    gen = np.random.default_rng(7)
    with Controller(instance) as ctl:
        wv = ctl.weight_version
        prefill_and_verify(client, gen, np.array([5, 9, 2]), wv)
        ctl.pause()
        ctl.clear()
        ctl.restore(wv + 1)
        ctl.resume()
        prefill_and_verify(client, gen, np.array([1, 4]), wv + 1)


def test_bad_tasks_fail_themselves_not_the_actors(served: str) -> None:
    """Tasks that skip the client's checks (another writer of the ring): every rank fails the task, with the
    reason; no actor dies."""
    with Client(served) as client:
        cfg, seq = client.cfg, client._seq
        two_d = np.zeros((2, 4), dtype=np.int32)
        raw = [
            (Role.WORKER, Prefill(next(seq), "x", two_d, np.array([0], dtype=np.int32)), "tokens must be a 1-D"),
            (Role.WORKER, Prefill(next(seq), "x", np.array([1.5, 2.0]), np.array([0])), "tokens must be a 1-D"),
            (Role.WORKER, Prefill(next(seq), "x", np.array([cfg.vocab]), np.array([0])), "token id .* out of range"),
            (Role.WORKER, Prefill(next(seq), "x", np.array([], dtype=np.int32), np.array([0])), "no tokens"),
            (Role.WORKER, Prefill(next(seq), "x", np.array([1]), np.array([0.0, 1.0])), "device blocks must be"),
            (Role.TRANSFER, SwapOut(next(seq), np.array([[1, 2]], dtype=np.int32)), "device blocks must be a 1-D"),
            (Role.TRANSFER, SwapIn(next(seq), np.array([1.0]), np.array([1])), "host slots must be a 1-D"),
            # Not even decodable as a task (the request's name is not a str): failed by its number on every rank.
            (Role.WORKER, Prefill(next(seq), 123, np.array([1]), np.array([0])), "cannot be decoded: .*Expected `str`"),  # type: ignore[arg-type]
        ]
        for role, task, reason in raw:
            with pytest.raises(TaskFailed, match=f"failed on 2 of 2 ranks: rank 0: .*{reason}"):
                client.wait(client._submit(role, task, "raw task"))
        _all_alive(client)
        _still_serves(served, client)


def test_the_client_refuses_bad_arguments_before_the_ring(served: str) -> None:
    with Client(served) as client:
        ring = client._tasks[Role.WORKER]
        cases = [
            (BadRequest, "request's name must be a str, got int", lambda: client.prefill(123, [1], [0])),  # type: ignore[arg-type]
            (BadRequest, "must be a str, got NoneType", lambda: client.prefill(None, [1], [0])),  # type: ignore[arg-type]
            (BadTask, "1..256 printable characters", lambda: client.prefill("", [1], [0])),
            (
                BadTask,
                "tokens must be a 1-D array of integers, got shape \\(2, 1\\)",
                lambda: client.prefill("x", [[1], [2]], [0]),
            ),
            (BadTask, "float64; cast whole numbers", lambda: client.prefill("x", np.array([1.0, 2.0]), [0])),
            (BadTask, "token id 1024 out of range", lambda: client.prefill("x", [1024], [0])),
            (
                BadBlocks,
                "device blocks must be a 1-D array of integers, got shape \\(1,\\) of float64",
                lambda: client.prefill("x", [1], [0.7]),
            ),
            (BadBlocks, "device blocks must be", lambda: client.read_blocks(np.array([1.9]))),
            (BadBlocks, "host slots \\[64\\] out of range", lambda: client.read_blocks([64], host=True)),
            (BadRequest, "host must be True or False", lambda: client.read_blocks([1], host="yes")),  # type: ignore[arg-type]
            (BadRequest, "free_slots must be True or False", lambda: client.swap_in([1], [1], free_slots=None)),  # type: ignore[arg-type]
            (BadBlocks, "2 host slots for 1 device blocks", lambda: client.swap_in([1, 2], [1])),
        ]
        for error, message, call in cases:
            before = ring.seg.buf[:64].tobytes(), client._tasks[Role.TRANSFER].seg.buf[:64].tobytes()
            with pytest.raises(error, match=message):
                call()
            after = ring.seg.buf[:64].tobytes(), client._tasks[Role.TRANSFER].seg.buf[:64].tobytes()
            assert before == after, f"{message}: something was written to a task ring"
        _all_alive(client)


# -- the CLI ------------------------------------------------------------------------------------------------------
def _bad_ctl_argv(name: str) -> st.SearchStrategy[list[str]]:
    """`mpkv ctl NAME ACTION ...` with at least one value that must be refused."""
    bad_timeout = st.sampled_from(["-1", "0", "nan", "inf", "-inf", "1e400", "x", "", "--"])
    bad_wv = st.one_of(
        st.integers(max_value=-1), st.integers(min_value=MAX_WEIGHT_VERSION + 1), st.sampled_from(["1.5", "v", ""])
    ).map(str)
    action = st.sampled_from(["status", "pause", "resume", "clear", "restore", "shutdown", "stop", ""])
    good_timeout = st.floats(0.1, 100).map(repr)
    return st.one_of(
        st.tuples(action, bad_timeout).map(lambda a: ["ctl", name, a[0], "--timeout", a[1]]),
        st.tuples(action, good_timeout, bad_wv).map(
            lambda a: ["ctl", name, a[0], "--timeout", a[1], "--weight-version", a[2]]
        ),
        st.sampled_from(["pause", "resume", "shutdown", "status"]).map(
            lambda a: ["ctl", name, a, "--weight-version", "3"]
        ),
        st.sampled_from(["pause", "restore", "shutdown"]).map(lambda a: ["ctl", name, a, "--host-only"]),
        st.just(["ctl", name, "clear", "--host-only", "--device-only"]),
        st.sampled_from(["stop", "PAUSE", "", "pause now"]).map(lambda a: ["ctl", name, a]),
    )


def _bad_launch_argv(name: str) -> st.SearchStrategy[list[str]]:
    """`mpkv launch --name NAME ...` (the running instance's name) with one value that must be refused."""
    positive = ["--tp", "--layers", "--kv-heads", "--head-dim", "--block-size", "--device-blocks", "--host-blocks"]
    return st.one_of(
        st.tuples(st.sampled_from(positive), st.sampled_from(["0", "-3", "1.5", "x", ""])).map(list),
        st.tuples(st.just("--weight-version"), st.sampled_from(["-5", "-1", str(2**61), str(2**64), "1e3"])).map(list),
        st.tuples(st.just("--dtype"), st.sampled_from(["int8", "", "float64"])).map(list),
        st.tuples(st.just("--nixl-port"), st.sampled_from(["-1", "65536", "80", "p"])).map(list),
        st.tuples(st.just("--config"), st.sampled_from(["/nonexistent/mpkv.json", "/dev/null", "/etc/passwd"])).map(
            list
        ),
        st.tuples(st.just("--vocab"), st.sampled_from(["0", str(2**31 + 1)])).map(list),
    ).map(lambda flag: ["launch", "--name", name, *flag])


def _run_cli(argv: list[str]) -> tuple[int, str]:
    code, _, err = _run_cli_out(argv)
    return code, err


def _run_cli_out(argv: list[str]) -> tuple[int, str, str]:
    """`mpkv ARGV` in this process (what `python -m mpkv.cli` runs, without the start of a Python with torch):
    exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = cli.main(argv)
        except SystemExit as e:
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


def test_bad_cli_arguments_are_refused_in_one_line_before_anything_is_written(served: str) -> None:
    with Client(served) as client:
        word = client.inst.control.read(CONTROL_COMMAND)

        @settings(FUZZ, max_examples=120)
        @given(argv=st.one_of(_bad_ctl_argv(served), _bad_launch_argv(served)))
        def one(argv: list[str]) -> None:
            code, err = _run_cli(argv)
            assert code != 0, f"{argv} was accepted"
            assert "Traceback" not in err and len(err.strip().splitlines()) == 1, f"{argv}: {err!r}"
            assert client.inst.control.read(CONTROL_COMMAND) == word, f"{argv} wrote the command word"

        one()
        _all_alive(client)
        _still_serves(served, client)


def test_launch_refuses_a_negative_weight_version(instance: str) -> None:
    code, err = _run_cli(["launch", "--name", instance, "--weight-version", "-5"])
    assert code == 2 and f"--weight-version: must be an integer in 0..{MAX_WEIGHT_VERSION}, got '-5'" in err, err
    code, err = _run_cli(["ctl", instance, "pause", "--timeout", "-1"])
    assert code == 2 and "--timeout: must be a number of seconds > 0, got '-1'" in err, err


# -- the config file: validated by msgspec against CacheConfig's own fields and ranges -----------------------------
MAX_WV = MAX_WEIGHT_VERSION


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"tp": 1, "kv_head": 4}, "unknown field 'kv_head' in {path}; the fields are layers, kv_heads, head_dim,"),
        ({"layers": 2, "tp": "2"}, "'tp' in {path} must be an integer >= 1, got '2'"),
        ({"block_size": 8.0}, "'block_size' in {path} must be an integer >= 1, got 8.0"),
        (
            {"weight_version": True},
            f"'weight_version' in {{path}} must be an integer in 0..{MAX_WEIGHT_VERSION}, got True",
        ),
        ({"dtype": "float64"}, "'dtype' in {path} must be one of float16, bfloat16, float32, got 'float64'"),
        ({"pool_owner": 1}, "'pool_owner' in {path} must be one of worker, transfer, got 1"),
        ({"nixl_port": 80}, "'nixl_port' in {path} must be 0 (off) or a port in 1024..65534, got 80"),
    ],
    ids=["unknown", "mistyped", "float", "bool", "dtype", "pool_owner", "nixl_port"],
)
def test_a_bad_config_file_is_refused_in_one_line_naming_the_field(
    instance: str, tmp_path: pathlib.Path, fields: dict[str, object], says: str
) -> None:
    """`mpkv launch --config FILE`: an unknown, mistyped or out-of-range field is one line that names it, with the
    valid range; a usage error (exit 2), and nothing is started. (In this process: the real command's own exit
    and output are checked once, below.)"""
    path = tmp_path / "mpkv.json"
    path.write_text(json.dumps(fields))
    code, out, err = _run_cli_out(["launch", "--name", instance, "--config", str(path)])
    assert (code, out) == (2, ""), (code, out, err)
    assert err.startswith(f"mpkv: launch {instance}: config: {says.format(path=path)}"), err
    assert err.count("\n") == 1 and "Traceback" not in err, err


def test_a_bad_config_file_is_refused_by_the_real_command(instance: str, tmp_path: pathlib.Path) -> None:
    """The same through `python -m mpkv.cli launch --config FILE`: exit 2, one line on stderr, nothing on stdout."""
    path = tmp_path / "mpkv.json"
    path.write_text(json.dumps({"tp": 1, "kv_head": 4}))
    args = [sys.executable, "-m", "mpkv.cli", "launch", "--name", instance, "--config", str(path)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout) == (2, ""), (out.returncode, out.stdout, out.stderr)
    assert out.stderr.startswith(f"mpkv: launch {instance}: config: unknown field 'kv_head' in {path}"), out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr


def test_cache_config_keeps_its_python_api_and_checks_every_way_in() -> None:
    """The same rules for the constructor, from_json and dataclasses.replace; the JSON form round-trips."""
    cfg = CacheConfig(tp=2, pd_role="decode", pool_owner=PoolOwner.TRANSFER)  # type: ignore[arg-type]
    assert (cfg.pd_role, cfg.pool_owner, cfg.heads_per_rank) == (PdRole.DECODE, PoolOwner.TRANSFER, 2)
    assert CacheConfig.from_json(cfg.to_json()) == cfg
    # An enum's name in any case, as configs written before the msgspec check (and Python callers) said it.
    shouted = cfg.to_json().replace('"decode"', '"DECODE"').replace('"transfer"', '"Transfer"')
    assert CacheConfig.from_json(shouted) == cfg
    for make, says in (
        (lambda: CacheConfig(tp=0), "config: tp must be an integer >= 1, got 0"),
        (lambda: CacheConfig(layers=True), "config: layers must be an integer >= 1, got True"),
        (lambda: dataclasses.replace(cfg, tp=3), "config: kv_heads (4) must be divisible by tp (3)"),
        (lambda: CacheConfig(stable_addresses=True), "config: stable_addresses needs backend cuda"),
        (lambda: CacheConfig.from_json('{"tp": 2, "colour": 1}'), "config: unknown field colour; the fields are"),
        (lambda: CacheConfig.from_json('{"tp": [2]}'), "config: tp must be an integer >= 1, got [2]"),
        (lambda: CacheConfig.from_json("[1]"), "config: expected a JSON object of CacheConfig fields, got list"),
    ):
        with pytest.raises(ValueError, match=f"^{re.escape(says)}"):
            make()
