"""What an instance's shared memory says about it, as plain data: the one reader behind `mpkv ctl status --json`
and `mpkv-top --json` (which adds queues, pools, transfers and problems). Reads only; never waits, never writes.
"""

from __future__ import annotations

import json
import time
from typing import Any

from mpkv.instance import CONTROL_COMMAND, CONTROL_LEDGER, Instance, controller_wait_slot, launcher_slot
from mpkv.protocol import ROLES, ActorState, ClearFlags, actor_slot
from mpkv.shm.signals import Signal


def weight_version(inst: Instance) -> int:
    """The weight version the KV in the pools belongs to (the controller's ledger; the config's before any)."""
    ledger = inst.control.read(CONTROL_LEDGER)
    return ledger.aux >> 2 if ledger.seq else inst.cfg.weight_version


def cleared(inst: Instance) -> ClearFlags:
    """The tiers cleared since the last restore (the ledger: counted from the moment a clear is asked for)."""
    ledger = inst.control.read(CONTROL_LEDGER)
    return ClearFlags(ledger.aux & 3) if ledger.seq else ClearFlags(0)


def actor_entry(role: str, rank: int, sig: Signal[ActorState], now_ns: int, error: str) -> dict[str, Any]:
    return {
        "role": role,
        "rank": rank,
        "pid": sig.writer.pid,
        "alive": sig.writer.alive() if sig.writer.pid else False,
        "state": sig.value.name,
        "epoch": sig.epoch,
        "aux": sig.aux,
        "heartbeat_age_s": round((now_ns - sig.timestamp_ns) / 1e9, 3) if sig.seq else None,
        "error": error.splitlines()[0] if error else "",
    }


def instance_status(inst: Instance) -> dict[str, Any]:
    cfg = inst.cfg
    cmd = inst.control.read(CONTROL_COMMAND)
    now = time.monotonic_ns()
    actors = []
    for rank in range(cfg.tp):
        for role in ROLES:
            slot = actor_slot(role, rank)
            entry = actor_entry(role.name.lower(), rank, inst.status.read(slot), now, inst.read_error(slot))
            actors.append(entry | {"waiting_for": inst.waiting_for(slot)})
    return {
        "instance": inst.name,
        "run_id": inst.registry.run_id,
        "config": json.loads(cfg.to_json()),
        "command": {"kind": cmd.value.name, "epoch": cmd.epoch, "aux": cmd.aux},
        "weight_version": weight_version(inst),
        "cleared": [f.name for f in ClearFlags if f in cleared(inst)],
        "launcher": actor_entry("launcher", -1, inst.status.read(launcher_slot(cfg.tp)), now, ""),
        "controller_waiting_for": inst.waiting_for(controller_wait_slot(cfg.tp)),
        "actors": actors,
    }
