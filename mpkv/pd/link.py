"""A prefill messager's hold on one rank's pool of a decode instance.

NOTE [ links ]
A prefill messager r that ships into decode instance D maps D's rank-r device pool: it is an attacher that D's
launcher never spawned. So that D's pool owner never frees memory a link still maps, every link has a status
slot in D (object ``links``, slot j * tp + r), written only by the messager holding it, and D's owner counts
those slots as attachers in ``handshake.decide`` (``_freed_view``: a link showing STOPPED maps nothing).

    open      write BOOTING@E (intent: "I may map your pool"), fence, then read D's command again.
              If D is not serving the pool of that command (cmd in NONE/RESUME/PAUSE, acknowledged by the
              owner), write STOPPED and refuse; else map the pool, write READY@E.
    clear     on D's CLEAR (device) or SHUTDOWN at epoch e: drop the mapping, write STOPPED@e.
    close     drop the mapping, write STOPPED.

Why the intent write comes first: D's owner reads its command (CLEAR) and then the link slots. If the owner
read a slot before our intent was visible, our later read of the command (after the fence) sees CLEAR, and we
do not map. Either the owner sees the intent and waits for us, or we see the clear and stay away: never both
blind. Pools are new shm names per restore epoch, so a link can never map a later pool by mistake either.
"""

from __future__ import annotations

from mpkv import _native, topology
from mpkv.config import CacheConfig
from mpkv.errors import (
    AttachError,
    LinkError,
)
from mpkv.handshake import Command, Status, link_may_map, link_must_unmap
from mpkv.instance import CONTROL_COMMAND, MAX_LINKS, Instance
from mpkv.pd.transport import SameHost, Transport
from mpkv.pool import AttachedPool, attach_device_pool
from mpkv.protocol import ActorState, Cmd, PdRole, actor_slot
from mpkv.shm.signals import SignalWriter
from mpkv.shm.waiting import Word
from mpkv.status import decode_pool_gone

S = ActorState


def compatible(src: CacheConfig, dst: CacheConfig) -> str:
    """Why KV of ``src``'s pools cannot go into ``dst``'s, or "" if it can."""
    if dst.pd_role != PdRole.DECODE:
        return f"it is a {dst.pd_role.name.lower()} instance, not a decode instance (mpkv launch --role decode)"
    for f in ("tp", "layers", "kv_heads", "head_dim", "block_size", "dtype"):
        if getattr(src, f) != getattr(dst, f):
            return f"its {f} is {getattr(dst, f)!r}, this instance's is {getattr(src, f)!r}"
    return ""


class Link:
    def __init__(self, dest: str, rank: int, src_cfg: CacheConfig) -> None:
        try:
            self.inst = Instance.attach(dest)
        except AttachError as e:
            raise LinkError(f"decode instance {dest!r} cannot be reached: {e}") from None
        try:
            why = compatible(src_cfg, self.inst.cfg)
            if why:
                raise LinkError(f"cannot ship KV into instance {dest!r}: {why}")
            self.dest, self.rank = dest, rank
            self.owner_slot = actor_slot(topology.pool_owner(self.inst.cfg), rank)
            self.index, self.writer = self._claim()
        except BaseException:
            self.inst.close()
            raise
        self.pool: AttachedPool | None = None
        self.transport: Transport | None = None
        self.dest_blocks = self.inst.cfg.device_blocks
        self.writer.write(S.STOPPED, 0)

    def _claim(self) -> tuple[int, SignalWriter[ActorState]]:
        for j in range(MAX_LINKS):
            try:
                return j, self.inst.links.writer(self.inst.link_slot(j, self.rank))
            except AttachError:
                continue
        raise LinkError(
            f"decode instance {self.dest!r} rank {self.rank} already has {MAX_LINKS} links from live prefill "
            "messagers; no free link slot"
        )

    @property
    def command_word(self) -> Word:
        """The decode instance's command word: sleep on it (``WakeSet``) to notice a clear at once."""
        return self.inst.control.word(CONTROL_COMMAND)

    def command(self) -> Command:
        sig = self.inst.control.read(CONTROL_COMMAND)
        return Command(sig.value, sig.epoch, sig.aux)

    def open(self) -> Transport:
        """The transport into the decode pool, mapping it first if needed (the intent protocol above)."""
        self.poll()
        if self.transport is not None:
            return self.transport
        cmd = self.command()
        self.writer.write(S.BOOTING, cmd.epoch)
        _native.fence()
        cmd = self.command()
        owner = self.inst.status.read(self.owner_slot)
        alive = owner.value != S.FAILED and owner.writer.alive()
        if not link_may_map(cmd, Status(owner.value, owner.epoch) if alive else None):
            self.writer.write(S.STOPPED, cmd.epoch)
            raise LinkError(
                f"decode instance {self.dest!r} is not serving: its last command is {cmd.kind.name}@{cmd.epoch} "
                f"and its pool owner shows {owner.value.name}@{owner.epoch}"
            )
        try:
            handle = self.inst.read_handle(self.rank)
            self.pool = attach_device_pool(self.inst.cfg, handle)
            self.transport = SameHost(self.pool.tensor)
        except BaseException:
            self.drop(cmd.epoch)  # announced but not mapped: say so, or the owner's clear would wait for us
            raise
        self.writer.write(S.READY, cmd.epoch)
        return self.transport

    def poll(self) -> str:
        """Let go of the pool if the decode instance clears it or stops; returns why, or "" if nothing changed."""
        cmd = self.command()
        if link_must_unmap(cmd) and (self.pool is not None or self._shown().epoch < cmd.epoch):
            self.drop(cmd.epoch)
            done = "cleared its pool" if cmd.kind == Cmd.CLEAR else "is shutting down"
            return f"decode instance {self.dest!r} {done} (epoch {cmd.epoch})"
        return ""

    def gone(self) -> str:
        """Why the decode instance is no longer there (its launcher stopped or died), or ""."""
        launcher = self.inst.launcher_gone()
        return f"decode instance {self.dest!r} is gone ({launcher})" if launcher else ""

    def broken(self) -> str:
        """Why what was shipped so far may not have landed in a live pool (cleared, owner dead, instance gone)."""
        return self.poll() or decode_pool_gone(self.inst, [self.rank])

    def _shown(self) -> Command:
        sig = self.inst.links.read(self.inst.link_slot(self.index, self.rank))
        return Command(Cmd.NONE, sig.epoch)

    def drop(self, epoch: int | None = None) -> None:
        transport, self.transport = self.transport, None
        pool, self.pool = self.pool, None
        if transport is not None:
            transport.close()
        if pool is not None:
            pool.close()
        self.writer.write(S.STOPPED, self._shown().epoch if epoch is None else epoch)

    def close(self) -> None:
        try:
            self.drop()
        finally:
            self.inst.close()
