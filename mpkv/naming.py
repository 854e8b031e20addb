"""Every OS name mpkv uses is built here, and nowhere else.

Names live in the POSIX shared-memory namespace (``/dev/shm`` on Linux)::

    /mpkv.u<uid>.<instance>.registry                 the instance's registry (its anchor: holds the run id)
    /mpkv.u<uid>.<instance>.<run_id>.<object>        every other segment of one run of that instance

The uid keeps two users apart; the instance name keeps two instances apart; the run id keeps a new run apart
from the leftovers of a killed one. Everything is created O_EXCL with mode 0600 (mpkv.shm.segment), so a
squatter makes creation fail loudly instead of being used.

The run id is visible to every local user in the listing of ``/dev/shm``, so a name made only of it and a
counter can be squatted in advance by another user. Objects created while the instance runs (the pools, one
per restore) therefore carry a random part of their own (``unique``), which no listing reveals before the
name exists; their owner hands the full name to its attachers through the (0600) handle record.
"""

from __future__ import annotations

import os
import re
import secrets
import tempfile

from mpkv import layout
from mpkv.errors import (
    BadName,
)

PREFIX = "mpkv"
SHM_DIR = "/dev/shm"
_INSTANCE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$")
_OBJECT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,47}$")


def check_instance(instance: str) -> str:
    if not _INSTANCE_RE.match(instance):
        raise BadName(
            f"instance name {instance!r} is not valid: use 1-40 letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return instance


_RUN_RE = re.compile(r"^[0-9a-f]{8}$")
NAME_MAX = layout.REG_NAME_BYTES  # a name must fit its registry entry


def new_run_id() -> str:
    return secrets.token_hex(4)


def is_run_id(run_id: str) -> bool:
    return bool(_RUN_RE.match(run_id))


def unique(obj: str) -> str:
    """``obj`` with an unguessable part appended: a name no other user can create before we do."""
    return f"{obj}.{secrets.token_hex(6)}"


def user_prefix(uid: int | None = None) -> str:
    return f"{PREFIX}.u{os.getuid() if uid is None else uid}."


def registry_name(instance: str, uid: int | None = None) -> str:
    return f"/{user_prefix(uid)}{check_instance(instance)}.registry"


def run_prefix(instance: str, run_id: str) -> str:
    """What every name of one run of an instance starts with (but its registry's)."""
    if not is_run_id(run_id):
        raise BadName(f"run id {run_id!r} is not 8 hex digits")
    return f"/{user_prefix()}{check_instance(instance)}.{run_id}."


def object_name(instance: str, run_id: str, obj: str) -> str:
    if not _OBJECT_RE.match(obj):
        raise BadName(f"object name {obj!r} is not valid: use 1-48 letters, digits, '.', '-' or '_'")
    name = run_prefix(instance, run_id) + obj
    if len(name) > NAME_MAX:
        raise BadName(f"name {name} is {len(name)} characters; a registry entry holds {NAME_MAX}")
    return name


def shm_path(name: str) -> str:
    return os.path.join(SHM_DIR, name.lstrip("/"))


def list_names(uid: int | None = None) -> list[str]:
    """Every mpkv name of this user now present in the shared-memory namespace, sorted."""
    prefix = user_prefix(uid)
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:  # pragma: no cover - Linux always has /dev/shm
        return []
    return sorted("/" + e for e in entries if e.startswith(prefix))


def instance_of(name: str) -> str | None:
    """The instance a name of ours belongs to, or None for a name that is not one of ours."""
    prefix = "/" + user_prefix()
    if not name.startswith(prefix):
        return None
    return name[len(prefix) :].split(".", 1)[0] or None


def is_registry(name: str) -> bool:
    return name.endswith(".registry") and instance_of(name) is not None


# -- the objects of a run: the last part of their names (object_name makes the full name) --------------------------
# Their shape (size, writers, readers) is mpkv.topology's table; only their names are spelled here.

CONFIG, CONTROL, STATUS, WAITS = "config", "control", "status", "waits"
USAGE, ERRORS, HANDLES = "usage", "errors", "handles"
PROGRESS, SENDBAR = "progress", "sendbar"  # prefill instances
WEIGHTS, ALLREDUCE = "weights", "allreduce"  # the weights published per version; the workers' collective
LINKS, LEASES = "links", "leases"  # decode instances
DEVICE_POOL, HOST_POOL = "pool.dev", "pool.host"  # the stem of every pool's name (controller: "still mapped?")


def task_ring(role: str) -> str:
    """The task ring read by the actors of ``role`` (lower-case role name: ``worker``, ``transfer``)."""
    return f"tasks.{role}"


def done_ring(role: str, rank: int) -> str:
    """The completion ring written by actor (``role``, ``rank``) and read by the client."""
    return f"done.{role}.r{rank}"


def device_pool(rank: int, epoch: int) -> str:
    """Rank ``rank``'s device pool of restore epoch ``epoch`` (its owner appends ``unique``'s random part)."""
    return f"{DEVICE_POOL}.r{rank}.e{epoch}"


def vmm_socket(instance: str, run_id: str, rank: int, epoch: int) -> str:
    """The abstract unix socket on which a stable-address pool's owner hands its memory's file descriptor to the
    attachers (mpkv.pool.vmm): gone with its last descriptor (kill -9 included); both ends check the other's uid."""
    return "\0" + object_name(instance, run_id, unique(f"vmm.r{rank}.e{epoch}")).lstrip("/")


def host_pool(rank: int, epoch: int) -> str:
    return f"{HOST_POOL}.r{rank}.e{epoch}"


WEIGHTS_STEM = "wts"  # every segment of published weights (mpkv.publication): the launcher reclaims orphans by it


def weights_buffers() -> str:
    """A fresh id for one set of weight buffers (the buckets and manifest a publisher writes and may reuse)."""
    return secrets.token_hex(4)


def weights_bucket(buffers: str, bucket: int) -> str:
    """Bucket ``bucket`` of the weight buffers ``buffers`` (its creator appends ``unique``'s random part)."""
    return f"{WEIGHTS_STEM}.{buffers}.b{bucket}"


def weights_manifest(buffers: str) -> str:
    return f"{WEIGHTS_STEM}.{buffers}.m"


def weights_buffers_of(name: str) -> str | None:
    """The buffers id in the full name of a weights segment of ours, or None for any other name."""
    obj = name.rsplit("/", 1)[-1].split(".")
    # mpkv.u<uid>.<instance>.<run>.wts.<buffers>.<b<k>|m>.<random>
    return obj[5] if len(obj) == 8 and obj[4] == WEIGHTS_STEM else None


# -- names outside /dev/shm: process titles, log files, NIXL agents --------------------------------------------------


def actor_title(role: str, rank: int, instance: str) -> str:
    """What ``ps`` shows for an actor (``mpkv::transfer:r1 inst0``); its first 15 bytes are the comm name."""
    return f"mpkv::{role}:r{rank} {instance}"


LAUNCHER_TITLE = "mpkv::launch:"  # what a launcher's title starts with; the instance name follows


def launcher_title(instance: str) -> str:
    return LAUNCHER_TITLE + instance


def log_root() -> str:
    """Where launchers make one log directory per instance: $MPKV_LOG_DIR, or a private per-user directory."""
    return os.environ.get("MPKV_LOG_DIR") or os.path.join(tempfile.gettempdir(), f"mpkv-logs.u{os.getuid()}")


def fresh_log_root() -> str:
    """A new private (0700, O_EXCL) log directory, for when the usual root cannot be trusted."""
    return tempfile.mkdtemp(prefix=f"mpkv-logs.u{os.getuid()}.")


def actor_log(log_dir: str, role: str, rank: int) -> str:
    return os.path.join(log_dir, f"{role}.r{rank}.log")


_ACTOR_LOG_RE = re.compile(r"^[a-z]+\.r\d+\.log$")


def actor_logs(log_dir: str) -> list[str]:
    """The actors' log files now in ``log_dir`` (as ``actor_log`` names them), sorted; OSError if unreadable."""
    return sorted(os.path.join(log_dir, f) for f in os.listdir(log_dir) if _ACTOR_LOG_RE.match(f))


def actor_profile(prefix: str, role: str, rank: int) -> str:
    """Where MPKV_PROFILE=prefix puts an actor's cProfile output."""
    return f"{prefix}.{role}.r{rank}"


def private_socket_dir() -> str:
    """A new private (0700, O_EXCL) directory for a benchmark's ipc:// socket: a fixed path in /tmp could be
    taken, or linked elsewhere, by another user first."""
    return tempfile.mkdtemp(prefix="mpkv-bench.")


def private_scratch_dir(what: str) -> str:
    """A new private (0700, O_EXCL) directory for a benchmark's scratch files (gloo's file store, a checkpoint it
    writes): nobody else can read, plant or link anything there."""
    return tempfile.mkdtemp(prefix=f"mpkv-bench.{what}.")


def bench_process(what: str) -> str:
    return f"mpkv-bench:{what}"


def nixl_agent(instance: str, rank: int) -> str:
    """The NIXL agent of an instance's rank: peers on other hosts find it by this name."""
    return f"mpkv.{instance}.r{rank}"
