"""What an instance's shared memory says about it, as plain data: the one reader behind `mpkv ctl status --json`
and `mpkv-top --json` (which adds queues, pools, transfers and problems). Reads only; never waits, never writes.
"""

from __future__ import annotations

import json
import time
from typing import Any

from mpkv.handshake import Command, Status, acknowledged, settled_ledger, step_done
from mpkv.instance import CONTROL_COMMAND, CONTROL_LEDGER, Instance, controller_wait_slot, launcher_slot
from mpkv.protocol import ROLES, ActorState, ClearFlags, actor_name, actor_slot
from mpkv.shm.signals import Signal


def ledger(inst: Instance) -> tuple[ClearFlags, int]:
    """What the controller's ledger records: the tiers cleared since the last restore, and the weight version the
    KV in the pools belongs to (the config's before any). ``settled`` counts what the last command did since."""
    sig = inst.control.read(CONTROL_LEDGER)
    return (ClearFlags(sig.aux & 3), sig.aux >> 2) if sig.seq else (ClearFlags(0), inst.cfg.weight_version)


def actor_statuses(inst: Instance) -> list[Status | None]:
    """Every actor's acknowledged state, rank-major (None: its process died), as ``handshake.step_done`` takes it."""
    out: list[Status | None] = []
    for rank in range(inst.cfg.tp):
        for role in ROLES:
            sig = inst.status.read_or_dead(actor_slot(role, rank))
            alive = sig.seq == 0 or sig.writer.alive()
            # An actor that stopped has exited: it acknowledged SHUTDOWN, and that stays true.
            out.append(Status(sig.value, sig.epoch) if alive or sig.value == ActorState.STOPPED else None)
    return out


def settled(inst: Instance) -> tuple[Command, list[Status | None], ClearFlags, int]:
    """The last command, every actor's status, what is cleared and the weight version, with what the last command
    did counted (``handshake.settled_ledger``); ``step_done(cmd, statuses)`` says whether it is acknowledged."""
    sig = inst.control.read(CONTROL_COMMAND)
    cmd = Command(sig.value, sig.epoch, sig.aux)
    statuses = actor_statuses(inst)
    return (cmd, statuses, *settled_ledger(cmd, step_done(cmd, statuses), *ledger(inst)))


def pending(cmd: Command, statuses: list[Status | None], tp: int) -> list[str]:
    """The actors (rank-major, as ``actor_statuses``) that have not acknowledged ``cmd``: dead, FAILED or behind."""
    names = [actor_name(role, rank) for rank in range(tp) for role in ROLES]
    return [
        f"{name} ({'dead' if s is None else f'{s.state.name}@{s.epoch}'})"
        for name, s in zip(names, statuses, strict=True)
        if not acknowledged(cmd, s)
    ]


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
    cmd, statuses, tiers, version = settled(inst)
    waiting = pending(cmd, statuses, cfg.tp)
    now = time.monotonic_ns()
    actors = []
    for rank in range(cfg.tp):
        for role in ROLES:
            slot = actor_slot(role, rank)
            entry = actor_entry(role.name.lower(), rank, inst.status.read_or_dead(slot), now, inst.read_error(slot))
            actors.append(entry | {"waiting_for": inst.waiting_for(slot)})
    return {
        "instance": inst.name,
        "run_id": inst.registry.run_id,
        "config": json.loads(cfg.to_json()),
        "command": {"kind": cmd.kind.name, "epoch": cmd.epoch, "aux": cmd.aux},
        # A step the controller gave up on (failed, timed out) and the actors have not finished: only a retry of
        # that step, a full clear or a shutdown is admitted (handshake.check_command).
        "step": {"done": not waiting, "pending": waiting},
        "weight_version": version,
        "cleared": [f.name for f in ClearFlags if f in tiers],
        "launcher": actor_entry("launcher", -1, inst.status.read_or_dead(launcher_slot(cfg.tp)), now, ""),
        "controller_waiting_for": inst.waiting_for(controller_wait_slot(cfg.tp)),
        "actors": actors,
    }
