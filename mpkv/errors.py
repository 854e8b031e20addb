"""Every error mpkv raises. Each message reads like a diagnosis: what, who, and what to do."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mpkv.protocol import Done


class MpkvError(Exception):
    """Base of every mpkv error."""


class AttachError(MpkvError):
    """A named object could not be attached: missing, foreign, wrong version or size, another user's."""


class NameTaken(MpkvError):
    """Creating an object failed: its OS name exists (a live instance, a leftover, a squatter)."""


class WaitTimeout(MpkvError, TimeoutError):
    """A bounded wait reached its deadline; the message names the peer that did not deliver."""


class PeerDied(MpkvError):
    """The process a wait depended on is dead (or detached); the message names it."""


class ProtocolError(MpkvError):
    """Peers disagree about the protocol: mismatched barrier keys, wrong record sizes, wrong roles."""


class MessageTooLarge(MpkvError, ValueError):
    """A message is larger than the ring can ever hold; nothing was written."""


class BadName(MpkvError, ValueError):
    """An instance or object name that mpkv cannot use."""


class TornSlot(PeerDied):
    """A slot's writer died between its two sequence stores: the slot holds no valid record until a new writer
    takes it over (and repairs it). Readers that can act without it (keep the last record they read, count the
    writer as dead) catch this; others see a PeerDied naming the writer."""


class NotOurs(AttachError):
    """A file in our name space that we must not trust: not a regular file, another user's, or not 0600."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path} {reason}")
        self.reason = reason


class CommandRefused(MpkvError):
    """The command makes no sense in the instance's state (e.g. restore before clear); nothing was changed."""


class StepFailed(MpkvError):
    """An actor failed or died during a step; the message names it, its rank and the step."""


class WeightUpdateFailed(MpkvError):
    """A one-call weight update (``Controller.weight_update``) failed at a named step; the message says which,
    why, and the state it left the instance in (serving the old weights again, or what to do)."""


class MemoryHeld(MpkvError):
    """A clear was acknowledged by every actor, but NVML shows GPU memory still held (``mpkv.pool.release``); the
    message names each process and its figures. The instance is cleared: the next restore allocates afresh."""


class InstanceNotServing(MpkvError):
    """The instance is paused, cleared or failed: the task was not submitted."""


class TaskFailed(MpkvError):
    """A task failed on at least one rank; the message lists each failing rank's reason."""

    def __init__(self, message: str, dones: list[Done]) -> None:
        super().__init__(message)
        self.dones = dones


class BadTicket(MpkvError, TypeError):
    """What was waited for is not a ticket of this client; nothing was read."""


class TransferFailed(TaskFailed):
    """A PD batch failed on at least one rank (worker or messager); its leases were failed, with the reasons."""


class LaunchError(MpkvError):
    """The instance could not start, or an actor died: the message names it."""


class KVMismatch(MpkvError, AssertionError):
    """KV read back from an instance differs from the model's recomputation: the message names the first rank,
    block and layer that differ (mpkv.verify)."""


class UnsafeDir(MpkvError):
    """A directory we would write into is not private to us; the message is "<path> <what is wrong>"."""


class LeaseError(MpkvError):
    """A lease cannot be granted or used: no free blocks, a block still in flight, a lease of a cleared pool."""


class ModelError(MpkvError, ValueError):
    """A model directory cannot be used: an unsupported architecture or config key (named), a checkpoint missing
    a tensor or holding one of the wrong shape, a malformed shard index. Nothing was loaded."""


class StaleWeights(MpkvError):
    """A generation saw completions of two weight versions (a restore ran in the middle): its tokens would mix
    KV of both, so none are returned."""


class LinkError(MpkvError):
    """The decode instance cannot take KV from this link now; the message says why."""


class NixlUnavailable(MpkvError):
    """NIXL is not installed (pip install 'mpkv[nixl]'), or could not start an agent."""


class BadTask(MpkvError, ValueError):
    """A task's arguments cannot be used; nothing was submitted (or, in an actor, the task failed)."""


class BadBlocks(BadTask):
    """Block or slot ids that cannot be used; nothing was copied."""


class BadRequest(BadTask, TypeError):
    """An argument of the wrong type (a request name that is not a str, a flag that is not a bool)."""
