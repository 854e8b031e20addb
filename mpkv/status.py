"""What an instance's shared memory says about it, as plain data: the one reader behind `mpkv ctl status --json`
and `mpkv-top --json` (which adds queues, pools, transfers and problems). Reads only; never waits, never writes.
"""

from __future__ import annotations

import json
import time
from typing import Any

from mpkv.handshake import Command, Status, settled_ledger, step_done
from mpkv.instance import CONTROL_COMMAND, CONTROL_LEDGER, Instance, controller_wait_slot, launcher_slot
from mpkv.protocol import ACK_OF, ROLES, ActorState, ClearFlags, actor_name, actor_slot
from mpkv.shm.signals import Signal


def weight_version(inst: Instance) -> int:
    """The weight version the KV in the pools belongs to, as the controller's ledger records it (the config's
    before any); ``settled`` counts a RESTORE acknowledged after its controller gave up waiting."""
    ledger = inst.control.read(CONTROL_LEDGER)
    return ledger.aux >> 2 if ledger.seq else inst.cfg.weight_version


def cleared(inst: Instance) -> ClearFlags:
    """The tiers cleared since the last restore (the ledger: counted from the moment a clear is asked for)."""
    ledger = inst.control.read(CONTROL_LEDGER)
    return ClearFlags(ledger.aux & 3) if ledger.seq else ClearFlags(0)


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


def settled(inst: Instance) -> tuple[Command, bool, ClearFlags, int]:
    """The last command, whether every actor acknowledged it, what is cleared and the weight version, with a late
    RESTORE counted (``handshake.settled_ledger``)."""
    sig = inst.control.read(CONTROL_COMMAND)
    cmd = Command(sig.value, sig.epoch, sig.aux)
    done = step_done(cmd, actor_statuses(inst))
    return (cmd, done, *settled_ledger(cmd, done, cleared(inst), weight_version(inst)))


def pending_actors(inst: Instance, cmd: Command) -> list[str]:
    """The actors that have not acknowledged ``cmd`` yet (dead or FAILED ones included)."""
    target = ACK_OF[cmd.kind]
    out = []
    for rank in range(inst.cfg.tp):
        for role in ROLES:
            sig = inst.status.read_or_dead(actor_slot(role, rank))
            if sig.value == ActorState.FAILED or not sig.at_least(target, cmd.epoch):
                out.append(f"{actor_name(role, rank)} ({sig.value.name}@{sig.epoch})")
    return out


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
    cmd, done, tiers, version = settled(inst)
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
        "step": {"done": done, "pending": [] if done else pending_actors(inst, cmd)},
        "weight_version": version,
        "cleared": [f.name for f in ClearFlags if f in tiers],
        "launcher": actor_entry("launcher", -1, inst.status.read_or_dead(launcher_slot(cfg.tp)), now, ""),
        "controller_waiting_for": inst.waiting_for(controller_wait_slot(cfg.tp)),
        "actors": actors,
    }
