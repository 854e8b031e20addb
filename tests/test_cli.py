"""The fixed command-line surface: `mpkv ctl NAME ...` exits 0 on success and non-zero with a message naming
the straggler on failure. (`mpkv launch` on SIGINT/SIGTERM: test_lifecycle_faults.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

from instances import Launched


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
