"""The fixed command-line surface: `mpkv ctl NAME ...` exits 0 on success and non-zero with a message naming
the straggler on failure; `mpkv launch` stops cleanly on SIGINT."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

from instances import Launched

from mpkv.naming import list_names


def ctl(instance: str, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mpkv.cli", "ctl", instance, *args], capture_output=True, text=True, timeout=timeout_s
    )


def test_one_rl_cycle_through_the_cli(instance: str) -> None:
    with Launched(instance, tp=2) as inst:
        for args, says in (
            (("pause",), "pause done at epoch 1"),
            (("clear",), "clear done at epoch 2"),
            (("clear",), "already cleared"),
            (("restore", "--weight-version", "3"), "restore done at epoch 3"),
            (("resume",), "resume done at epoch 4"),
        ):
            out = ctl(instance, *args)
            assert out.returncode == 0 and says in out.stdout, (args, out.stdout, out.stderr)
        st = json.loads(ctl(instance, "status", "--json").stdout)
        assert st["weight_version"] == 3 and {a["state"] for a in st["actors"]} == {"READY"}
        assert all(a["heartbeat_age_s"] is not None and a["alive"] for a in st["actors"])
        assert ctl(instance, "shutdown").returncode == 0
        assert inst.exit_code() == 0


def test_ctl_names_the_straggler_and_exits_nonzero(instance: str) -> None:
    with Launched(instance, tp=2, fault="transfer:1:PAUSE:hang"):
        out = ctl(instance, "pause", "--timeout", "2")
        assert out.returncode == 1
        assert "PAUSE@1 failed: transfer r1 did not acknowledge within 2 s" in out.stderr, out.stderr
    out = ctl(instance, "status")
    assert out.returncode == 1 and f"instance '{instance}' is not running here" in out.stderr


def test_sigint_stops_the_launcher_cleanly(instance: str) -> None:
    inst = Launched(instance, tp=1)
    inst.wait_line("ready")
    inst.proc.send_signal(signal.SIGINT)
    assert inst.exit_code() == 0
    assert any("SIGINT received, shutting down" in line for line in inst.lines)
    inst.__exit__()
    assert not [n for n in list_names() if instance in n]
