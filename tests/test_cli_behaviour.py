"""`mpkv` and `mpkv-top` behave like well-made Unix tools: --version, every flag's default in its help, a health
exit code for `ctl status`, and a quiet end when the reader of their output leaves (`| head -1`)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import select
import signal
import subprocess
import sys
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import pytest
from instances import SMALL, Launched

from mpkv import cli, top
from mpkv.logs import LEVELS
from mpkv.naming import launcher_title, list_names

DEADLINE_S = 60.0
MPKV = [sys.executable, "-m", "mpkv.cli"]
TOP = [sys.executable, "-m", "mpkv.top"]


def run(args: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=DEADLINE_S, **kw)  # type: ignore[call-overload]


def in_process(main: Callable[[list[str]], int], argv: list[str]) -> subprocess.CompletedProcess[str]:
    """What `mpkv ARGV` (``main``: cli.main, or top.main for mpkv-top) exits with and prints, run in this process:
    the same code as the real command's, without starting a Python that imports torch (the real command itself:
    test_version_prints_the_installed_version, test_a_usage_error_through_the_real_command)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's exits (usage errors, --help)
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def wait_exited(pid: int) -> None:
    """Bounded: a pidfd becomes readable once the process has exited (a zombie counts)."""
    fd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([fd], [], [], DEADLINE_S)
        assert ready, f"pid {pid} still running {DEADLINE_S:g} s after SIGKILL"
    finally:
        os.close(fd)


def test_version_prints_the_installed_version() -> None:
    out = run([*MPKV, "--version"])
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"mpkv {version('mpkv')}\n"


# (argv with {i} for the instance, exit code, what stderr's one line starts with)
ERRORS = [
    (["launch", "--name", "{i}", "--tp", "0"], 2, "mpkv: launch: argument --tp: must be an integer >= 1, got '0'"),
    (["launch", "--name", "{i}", "--tp", "1", "--colour", "red"], 2, "mpkv: unrecognized arguments: --colour red"),
    (["ctl", "{i}"], 2, "mpkv: ctl: the following arguments are required: action"),
    (
        ["launch", "--name", "{i}", "--role", "middle"],
        2,
        "mpkv: launch: argument --role: invalid choice: 'middle' (choose from 'mixed', 'prefill', 'decode')",
    ),
    (
        ["launch", "--name", "{i}", "--kv-heads", "3", "--tp", "2"],
        2,
        "mpkv: launch {i}: config: --kv-heads (3) must be divisible by --tp (2)",
    ),
    (
        ["launch", "--name", "{i}", "--nixl-port", "80"],
        2,
        "mpkv: launch {i}: config: --nixl-port must be 0 (off) or a port in 1024..65534, got 80",
    ),
    (
        ["launch", "--name", "{i}", "--stable-addresses"],
        2,
        "mpkv: launch {i}: config: --stable-addresses needs --backend cuda (a CUDA virtual-memory pool)",
    ),
    (["launch", "--name", "{i}/x"], 2, "mpkv: launch: argument --name: instance name '{i}/x' is not valid"),
    # Not a usage error: the command is well formed, the instance is just not running (as `kill` of a gone pid): 1.
    (["ctl", "{i}", "status"], 1, "mpkv: instance '{i}' is not running here"),
]


@pytest.mark.parametrize(("argv", "code", "says"), ERRORS, ids=[" ".join(argv) for argv, _, _ in ERRORS])
def test_errors_are_one_mpkv_line_and_usage_errors_exit_2(instance: str, argv: list[str], code: int, says: str) -> None:
    out = in_process(cli.main, [a.format(i=instance) for a in argv])
    assert (out.returncode, out.stdout) == (code, ""), (out.returncode, out.stdout, out.stderr)
    assert out.stderr.startswith(says.format(i=instance)), out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr


def test_a_usage_error_through_the_real_command(instance: str) -> None:
    """The first of ERRORS as `python -m mpkv.cli ...`: the process's exit code and output are the same."""
    argv, code, says = ERRORS[0]
    out = run([*MPKV, *(a.format(i=instance) for a in argv)])
    assert (out.returncode, out.stdout) == (code, ""), (out.returncode, out.stdout, out.stderr)
    assert out.stderr.startswith(says.format(i=instance)), out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr


def _option_entries(help_text: str) -> dict[str, str]:
    """Each option of an argparse help, with its help text joined across the wrapped lines."""
    entries: dict[str, str] = {}
    current = None
    for line in help_text.splitlines():
        m = re.match(r"^  (-[-\w]+)", line)
        if m:
            current = m[1]
            entries[current] = line
        elif current and line.startswith("    "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


@pytest.mark.parametrize(
    "command",
    [[], ["cleanup"], ["launch"], ["ctl"], ["demo"], ["bench"], "mpkv-top"],
    ids=lambda c: " ".join(c) if isinstance(c, list) else c,
)
def test_every_flag_help_shows_its_default(command: list[str] | str) -> None:
    out = in_process(top.main, ["--help"]) if command == "mpkv-top" else in_process(cli.main, [*command, "--help"])
    assert out.returncode == 0, out.stderr
    entries = {k: v for k, v in _option_entries(out.stdout).items() if k not in ("-h", "--version")}
    assert entries or command == [], out.stdout
    missing = [k for k, text in entries.items() if "(default: " not in text and "(required" not in text]
    assert not missing, f"flags whose help does not show the default: {missing}\n{out.stdout}"


def test_ctl_status_exits_1_when_an_actor_is_dead(instance: str) -> None:
    with Launched(instance, tp=1) as inst:
        pids = inst.pids
        healthy = run([*MPKV, "ctl", instance, "status"])
        assert healthy.returncode == 0 and healthy.stderr == "", healthy.stderr
        # The launcher, stopped, cannot tear the instance down yet: the dead actor stays in the status.
        inst.proc.send_signal(signal.SIGSTOP)
        try:
            os.kill(pids["transfer:r0"], signal.SIGKILL)
            wait_exited(pids["transfer:r0"])
            out = run([*MPKV, "ctl", instance, "status"])
            as_json = run([*MPKV, "ctl", instance, "status", "--json"])
        finally:
            inst.proc.send_signal(signal.SIGCONT)
        assert out.returncode == 1, (out.stdout, out.stderr)
        assert "DEAD" in out.stdout and f"instance {instance} run" in out.stdout, out.stdout
        assert f"transfer r0 (pid {pids['transfer:r0']}) is dead" in out.stderr, out.stderr
        assert as_json.returncode == 1
        dead = [a for a in json.loads(as_json.stdout)["actors"] if not a["alive"]]
        assert [(a["role"], a["rank"]) for a in dead] == [("transfer", 0)]
        assert inst.exit_code() == 1  # the launcher, resumed, sees the dead actor and tears down


def test_a_reader_that_leaves_ends_the_output_quietly(instance: str) -> None:
    with Launched(instance, tp=1):
        for cmd in ([*TOP, "--once", "--json"], [*MPKV, "ctl", instance, "status", "--json"]):
            # A reader gone before the first write: the write must fail, so the outcome does not depend on timing.
            r, w = os.pipe()
            os.close(r)
            try:
                out = subprocess.run(cmd, stdout=w, stderr=subprocess.PIPE, text=True, timeout=DEADLINE_S)
            finally:
                os.close(w)
            assert (out.returncode, out.stderr) == (141, ""), (cmd, out.returncode, out.stderr)
            # And through a real `| head -1`, which may leave at any point of the output.
            line = " ".join(cmd)
            piped = run(["bash", "-c", f"set -o pipefail; {line} | head -1; echo codes ${{PIPESTATUS[*]}}"])
            assert piped.stderr == "", (cmd, piped.stderr)
            first, codes = piped.stdout.splitlines()
            assert first == "{" and codes in ("codes 0 0", "codes 141 0"), (cmd, piped.stdout)


def _launch_args(instance: str, *extra: str) -> list[str]:
    args = [*MPKV, "launch", "--name", instance, "--tp", "1", *extra]
    for k, v in SMALL.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


# mpkv.logs' one format: time, process (the launcher or an actor), level, message.
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} (launcher|(worker|transfer|messager):r0) (?P<level>[A-Z]+) \S")
ACTORS = ("worker", "transfer", "messager")


def _not_in_the_format(text: str) -> list[str]:
    return [line for line in text.splitlines() if not LOG_LINE.match(line)]


def _levels(text: str) -> set[str]:
    return {m["level"] for m in map(LOG_LINE.match, text.splitlines()) if m}


def test_ctrl_c_after_ready_tears_down_quietly_and_exits_130(instance: str, tmp_path: Path) -> None:
    # Ctrl-C at a terminal signals the whole foreground process group: the launcher, its forkserver and actors.
    # The launcher leads a group of its own here, so that the test can signal all of it as a terminal would.
    # Launched with --log-level info (over MPKV_LOG_LEVEL: the flag wins): the launcher's lines and its actors',
    # which inherit the level, on stderr and in the actors' files, all in mpkv.logs' one format.
    env = os.environ | {"MPKV_LOG_DIR": str(tmp_path), "MPKV_LOG_LEVEL": "ERROR"}
    args = _launch_args(instance, "--log-level", "info")
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], DEADLINE_S)
        line = proc.stdout.readline() if ready else ""
        assert " ready (" in line, (line, proc.poll())
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=DEADLINE_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=DEADLINE_S)
    assert "SIGINT received, shutting down" in out, out
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert proc.returncode == 130, (proc.returncode, err)
    assert not [n for n in list_names() if instance in n], "names left behind after Ctrl-C"
    assert not _not_in_the_format(err) and "INFO" in _levels(err), err
    assert f"launcher INFO launching {instance} (pid {proc.pid}), log level INFO" in err, err
    for role in ACTORS:
        assert f"{role}:r0 INFO started: pid " in err, err
        text = (tmp_path / instance / f"{role}.r0.log").read_text()
        assert f"{role}:r0 INFO started: pid " in text and not _not_in_the_format(text), text


def test_a_bad_log_level_is_a_usage_error(instance: str) -> None:
    bad = run(_launch_args(instance), env=os.environ | {"MPKV_LOG_LEVEL": "loud"})
    assert (bad.returncode, bad.stdout, bad.stderr) == (
        2,
        "",
        f"mpkv: launch {instance}: MPKV_LOG_LEVEL='loud' is not a log level: use one of {', '.join(LEVELS)}\n",
    )


def _proc(pid: int, what: str) -> str:
    with open(f"/proc/{pid}/{what}", "rb") as f:
        return f.read().decode().rstrip("\n")


def test_processes_carry_full_titles_and_log_below_warning_only_to_files(instance: str, tmp_path: Path) -> None:
    env = {"MPKV_LOG_LEVEL": "", "MPKV_LOG_DIR": str(tmp_path)}  # the default level, WARNING
    with Launched(instance, tp=1, env=env) as inst:
        pids = inst.pids
        assert set(pids) == {"worker:r0", "transfer:r0", "messager:r0"}, inst.lines
        for who, pid in pids.items():
            title = f"mpkv::{who} {instance}"
            assert _proc(pid, "cmdline").rstrip("\0") == title
            assert _proc(pid, "comm") == title[:15]  # the kernel's limit for the name top shows
        assert _proc(inst.proc.pid, "cmdline").rstrip("\0") == f"mpkv::launch:{instance}"
        for role in ACTORS:  # the files record INFO whatever the level: mpkv-top reads the transitions there
            text = (tmp_path / instance / f"{role}.r0.log").read_text()
            assert f"{role}:r0 INFO started: pid " in text and not _not_in_the_format(text), text
    said = list(inst.lines)  # stdout and stderr, to the launcher's exit
    assert not [line for line in said if re.search(r"\b(TRACE|DEBUG|INFO|SUCCESS)\b", line)], said


def test_without_setproctitle_the_comm_name_still_is_set() -> None:
    code = (
        "import sys; sys.modules['setproctitle'] = None\n"  # the import fails, as where it is not installed
        "from mpkv.actors.entry import set_process_title\n"
        "set_process_title('mpkv::transfer:r1 someinstance')\n"
        "print(open('/proc/self/comm').read().strip()); print(open('/proc/self/cmdline').read())"
    )
    out = run([sys.executable, "-c", code])
    assert out.returncode == 0, out.stderr
    comm, cmdline = out.stdout.split("\n", 1)
    assert comm == "mpkv::transfer:" and "-c" in cmdline.split("\0"), out.stdout


def test_cleanup_removes_the_log_directories_of_gone_instances_only(instance: str, tmp_path: Path) -> None:
    root = tmp_path / "logs"
    env = {"MPKV_LOG_DIR": str(root)}
    gone, link = f"{instance}g", f"{instance}l"
    with Launched(gone, tp=1, env=env):
        pass  # stopped by SIGTERM: its names go, its log directory stays behind
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("not a log")
    (root / link).symlink_to(victim, target_is_directory=True)

    def cleanup(*args: str) -> str:
        out = run([*MPKV, "cleanup", *args], env=os.environ | env)
        assert out.returncode == 0, out.stderr
        return out.stdout

    with Launched(instance, tp=1, env=env):
        assert (root / gone).is_dir() and (root / instance).is_dir()
        assert f"would remove log directory {root / gone}" in cleanup("--dry-run", "--name", gone)
        assert (root / gone).is_dir()
        said = cleanup("--name", instance)
        assert "log directory" not in said and (root / instance).is_dir(), said
        said = cleanup("--name", link)
        assert f"left alone {root / link}: it is a symbolic link or not a directory" in said, said
        assert (root / link).is_symlink() and (victim / "keep").read_text() == "not a log"
        assert f"removed log directory {root / gone}" in cleanup("--name", gone)
        assert not (root / gone).exists() and (root / instance).is_dir()


@pytest.mark.parametrize("titled", [True, False], ids=["full title", "comm name only"])
def test_cleanup_keeps_the_log_directory_of_a_launcher_still_starting(
    instance: str, tmp_path: Path, titled: bool
) -> None:
    """A launcher makes its log directory before its names: while it runs (known by its process title, or where
    setproctitle is missing by the first characters of the name in its comm name), cleanup keeps the directory."""
    root = tmp_path / "logs"
    root.mkdir(mode=0o700)
    (root / instance).mkdir(mode=0o700)
    env = os.environ | {"MPKV_LOG_DIR": str(root)}
    # What the launcher does first (mpkv.actors.entry.set_process_title, which imports torch with its package).
    code = (
        "import ctypes, sys\n"
        + ("from setproctitle import setproctitle; setproctitle(sys.argv[1])\n" if titled else "")
        + "ctypes.CDLL(None).prctl(15, sys.argv[1].encode()[:15], 0, 0, 0)\n"  # PR_SET_NAME: the comm name
        "print('titled', flush=True)\n"
        "sys.stdin.read()\n"
    )
    args = [sys.executable, "-c", code, launcher_title(instance)]
    with subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as child:
        try:
            assert child.stdout is not None and child.stdin is not None
            ready, _, _ = select.select([child.stdout], [], [], DEADLINE_S)
            assert ready and child.stdout.readline() == "titled\n", child.poll()
            kept = run([*MPKV, "cleanup", "--name", instance], env=env)
            assert kept.returncode == 0 and "log directory" not in kept.stdout, kept.stdout
            assert (root / instance).is_dir()
            child.stdin.close()
            child.wait(DEADLINE_S)
        finally:
            if child.poll() is None:
                child.kill()  # the with block reaps it
    gone = run([*MPKV, "cleanup", "--name", instance], env=env)
    assert f"removed log directory {root / instance}" in gone.stdout, gone.stdout
    assert not (root / instance).exists()
