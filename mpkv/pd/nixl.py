"""PD across hosts over NIXL (the optional extra ``mpkv[nixl]``; UCX moves host memory, so it runs without a GPU).

NOTE [ nixl path ]
A remote sender cannot take part in the decode instance's shared-memory handshake, and a one-sided write that
arrives after a clear could land in whatever memory replaced the pool. So remote bytes never go into the pool
directly: the decode messager r (an ordinary attacher of its rank's pool, covered by the handshake) owns a
staging buffer registered with its NIXL agent for its whole life, and it alone copies staged blocks into the pool,
after checking the lease. Per rank:

    receiver  decode messager r: agent "mpkv.<decode>.r<r>", listening on nixl_port + r; staging of SLOTS slots
              (a slot = one block's K and V of one layer), split into SENDERS regions: each sender gets its own
              region at hello and may write nowhere else.
    sender    prefill messager r: agent "mpkv.<prefill>.r<r>", listening on its instance's nixl_port + r (the
              receiver fetches its metadata from there), with a staging buffer of its own to write from.
    hello     sender: fetch the receiver's metadata, push its own, notify b"hello"; the receiver answers with
              the sender's staging region and its instance's config (for the geometry check).
    a layer   sender: copy the blocks' K/V into its staging, WRITE them into the receiver's staging with the
              notification b"w" + header (message id, lease slot, generation and token, the lease's destination
              blocks, which of them this write fills, layer, digest of the staged bytes); the receiver checks it
              (below), copies staging -> pool, answers b"ok <id>" or b"no <id> <reason>". One message in flight
              per sender.
    bye       a sender that closes its link notifies b"bye": its region is free for another sender at once.

Which writes land. A lease's generation is lease_check(token, slot, pool epoch, blocks) (mpkv.pd.leases): a
keyed hash under a secret 64-bit token that the engine draws at grant and hands only to the prefill instance
that ships the lease. The allocator alone writes it, into the lease's slot of the decode instance's ``leases``
array (0600, same user), so the receiver needs no other object: it lands a write only if that slot is GRANTED
at the header's generation on the pool it maps now, and lease_check of the header's token and blocks over that
slot and epoch gives that generation back. Nobody without the token can name a lease (64 unguessable bits, not
the small slot and generation alone), and the token's holder can write only the lease's own blocks, in range.

Regions come back. A sender's region is freed at its bye, and one idle for REGION_IDLE_S (a sender that went
away without a bye: killed, its host gone) is reclaimed when a new sender finds no free region; the receiver
then notifies the old owner b"bye" and forgets its metadata. A link idle for REGION_IDLE_S / 2 says hello again
before it writes (the receiver answers with the region it still holds, or a new one), so a sender that keeps
time never writes into a region that was reclaimed.

Which bytes land. Keeping time is not enough, and correctness does not rest on it: a one-sided write cannot be
revoked, and a sender that checked its region, then stalled past REGION_IDLE_S / 2 (stopped, swapped out) still
writes into the region after it was given to another sender B, at any moment, also between B's write and the
receiver landing it. So every header carries a digest of the staged bytes it vouches for (SHA-256, its first 16
bytes: with the SHA instructions of current CPUs it hashes more than twice as fast as blake2b), computed by the
sender over its own staging before its WRITE. The receiver first copies the slots out of staging into a private
tensor (a stale write may arrive while it reads), hashes that copy, and lands that same copy only if the digests
agree; otherwise it answers no and nothing lands. A stale write that came before B's is overwritten by it, one
that comes after the copy is never read, and one in between fails B's write, which is refused rather than landed
wrong (the ship fails like any refused write; it is rare: it needs a sender stalled for minutes). A digest is no
defence against a sender that means harm (see below), only against a stale write's bytes passing for another's.
Its cost per write: one hash on each side and one copy on the receiver (a full region of 4 MiB, measured on one
core: about 3 ms per hash and 0.5 to 1.6 ms for the copy, next to 2 ms for landing it).

What NIXL does not protect. The transport itself is not authenticated or encrypted: anyone who can reach the
agents' ports can connect, push metadata and write into the staging region it is given (never into the pool
or another sender's region), and anyone who can see the traffic sees tokens, which the next write of that
lease until it is settled. Run the cross-host path on a trusted network only. The receiver's checks keep a stray or
buggy sender from landing bytes outside a lease it was given; they are not a defence against a network attacker.
Every wait has a deadline and names the agent it waited for. Nothing here is a protocol of its own beyond the
header: NIXL moves the bytes and delivers the notifications.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from mpkv import naming
from mpkv.config import CacheConfig
from mpkv.errors import MpkvError, NixlUnavailable, WaitTimeout
from mpkv.pd.leases import lease_check
from mpkv.protocol import LeaseState
from mpkv.shm.waiting import Peer, wait_until

SLOTS = 256
SENDERS = 4  # a receiver's staging is split into SENDERS regions of SLOTS // SENDERS slots, one per sender
REGION = SLOTS // SENDERS
REPLY_TIMEOUT_S = 30.0
REGION_IDLE_S = float(os.environ.get("MPKV_NIXL_REGION_IDLE_S", "300"))  # a silent sender's region may go
DIGEST_SIZE = 16  # bytes of SHA-256 over a write's staged bytes that its header carries (NOTE [ nixl path ])


def load_nixl() -> Any:
    try:
        from nixl_cu12 import _api
    except ImportError:
        try:
            from nixl import _api  # type: ignore[no-redef]
        except ImportError:
            raise NixlUnavailable(
                "the cross-host transport needs NIXL: pip install 'mpkv[nixl]' (nixl-cu12; no GPU needed)"
            ) from None
    # NIXL logs INFO lines to stdout; an actor's stdout is its launcher's, whose first line says "ready".
    nixl_log = logging.getLogger("nixl")
    nixl_log.setLevel(logging.WARNING)
    for handler in nixl_log.handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sys.stderr)
    return _api


def agent_name(instance: str, rank: int) -> str:
    return naming.nixl_agent(instance, rank)


T = TypeVar("T")


def poll_until(poll: Callable[[], T | None], *, what: str, pace_s: float, peer: Peer) -> T:
    """``poll()`` until it returns something, within REPLY_TIMEOUT_S, through the one bounded wait (``wait_until``).
    NIXL runs without a progress thread, so nothing here can wake a sleeper: each slice polls it, pacing the polls
    by ``pace_s`` to yield the core (a poll's pace, not a synchronization)."""
    got: list[T] = []

    def step(slice_s: float, spin_s: float) -> bool:
        end = time.monotonic() + slice_s
        while (answer := poll()) is None:
            if time.monotonic() >= end:
                return False
            time.sleep(pace_s)
        got.append(answer)
        return True

    wait_until(step, what=what, timeout_s=REPLY_TIMEOUT_S, peers=lambda: [peer])
    return got[0]


def _agent(name: str, port: int) -> Any:
    api = load_nixl()
    # No progress thread: it would spin a core; the owner of the agent polls it in its own loop instead.
    conf = api.nixl_agent_config(enable_prog_thread=False, enable_listen_thread=True, listen_port=port)
    try:
        return api.nixl_agent(name, conf)
    except Exception as e:  # the bindings raise their own types
        raise NixlUnavailable(f"cannot start NIXL agent {name} on port {port}: {type(e).__name__}: {e}") from None


def slot_shape(cfg: CacheConfig) -> tuple[int, ...]:
    return (2, cfg.block_size, cfg.heads_per_rank, cfg.head_dim)


def digest(staged: torch.Tensor) -> str:
    """The hex digest of ``staged``'s bytes, which a write's header carries (NOTE [ nixl path ]: which bytes land)."""
    data = staged.contiguous().view(torch.uint8).numpy().data
    return hashlib.sha256(data).digest()[:DIGEST_SIZE].hex()


class Endpoint:
    """A messager's NIXL agent and its staging buffer of SLOTS slots, registered for the agent's whole life."""

    def __init__(self, instance: str, rank: int, cfg: CacheConfig) -> None:
        self.name = agent_name(instance, rank)
        self.agent = _agent(self.name, cfg.nixl_port + rank)
        self.staging = torch.zeros((SLOTS, *slot_shape(cfg)), dtype=cfg.torch_dtype)
        self.slot_bytes = self.staging[0].numel() * self.staging.element_size()
        self.addr = self.staging.data_ptr()
        self.reg = self.agent.register_memory([(self.addr, SLOTS * self.slot_bytes, 0, "")], "DRAM")

    def close(self) -> None:
        self.agent.deregister_memory(self.reg)


@dataclass
class Region:
    first: int  # its first staging slot
    last_active: float  # when its sender's last message came


class Receiver:
    """The decode messager's side. ``poll`` answers hellos and lands staged layers; call it often."""

    def __init__(self, endpoint: Endpoint, cfg: CacheConfig, leases: Any) -> None:
        self.cfg, self.leases, self.ep = cfg, leases, endpoint
        self.agent = endpoint.agent
        self._hellos: set[str] = set()
        self._regions: dict[str, Region] = {}  # sender agent -> its staging region
        self.last_active = 0.0

    def poll(self, pool: torch.Tensor | None, pool_epoch: int) -> None:
        for peer, msgs in self.agent.get_new_notifs().items():
            self.last_active = time.monotonic()
            for msg in msgs:
                if peer in self._regions:
                    self._regions[peer].last_active = self.last_active
                if msg == b"hello":
                    self._hellos.add(peer)
                elif msg == b"bye":
                    self._forget(peer)
                elif msg.startswith(b"w"):
                    self._land(peer, msg[1:], pool, pool_epoch)
        for peer in list(self._hellos):
            if self.agent.check_remote_metadata(peer):  # its pushed metadata has arrived: we can answer
                self._hellos.discard(peer)
                answer = self._region_for(peer)
                self._reply(peer, b"hi" + json.dumps(answer).encode())
                if "error" in answer:  # refused: it holds nothing here, and may try again later
                    self._forget(peer)

    def _reply(self, peer: str, msg: bytes) -> None:
        try:
            self.agent.send_notif(peer, msg)
        except Exception:  # the bindings' own types: a peer that went away (or never pushed metadata)
            pass  # gets no answer

    def _forget(self, peer: str) -> None:
        """The sender said bye, or its region was reclaimed: free the region, drop its metadata."""
        self._hellos.discard(peer)
        self._regions.pop(peer, None)
        try:
            self.agent.remove_remote_agent(peer)
        except Exception:  # the bindings' own types: already unknown to the agent
            pass

    def _region_for(self, peer: str) -> dict[str, Any]:
        """Each sender writes only into its own region: two senders never overwrite each other's staged bytes."""
        if peer not in self._regions:
            taken = {r.first for r in self._regions.values()}
            free = [r * REGION for r in range(SENDERS) if r * REGION not in taken]
            if not free:
                free = self._reclaim()
            if not free:
                now = time.monotonic()
                busy = ", ".join(f"{p} (idle {now - r.last_active:.0f} s)" for p, r in self._regions.items())
                return {
                    "error": f"{self.ep.name} already serves {SENDERS} senders: {busy}; a region is freed when "
                    f"its sender closes, or after {REGION_IDLE_S:g} s without a message from it"
                }
            self._regions[peer] = Region(free[0], time.monotonic())
        first = self._regions[peer].first
        addr = self.ep.addr + first * self.ep.slot_bytes
        return {"addr": addr, "slot": first, "slots": REGION, "config": json.loads(self.cfg.to_json())}

    def _reclaim(self) -> list[int]:
        """The region of the sender silent the longest, if longer than REGION_IDLE_S (its sender re-hellos after
        half that, so it never writes there again unannounced); told with a bye, in case it is still there."""
        peer, region = min(self._regions.items(), key=lambda kv: kv[1].last_active)
        if time.monotonic() - region.last_active < REGION_IDLE_S:
            return []
        self._reply(peer, b"bye")
        self._forget(peer)
        return [region.first]

    def _land(self, peer: str, raw: bytes, pool: torch.Tensor | None, pool_epoch: int) -> None:
        msg_id: object = "?"
        try:
            h = json.loads(raw)
            msg_id = int(h["id"])
            why = self._check(peer, h, pool, pool_epoch)
        except Exception as e:  # whatever a peer sent: refused, never fatal to this messager
            self._reply(peer, f"no {msg_id} malformed header, refused: {type(e).__name__}: {e}"[:512].encode())
            return
        if not why:
            # A copy first, hashed and landed as it is: a stale write into staging may arrive at any moment.
            staged = self.ep.staging[h["slot"] : h["slot"] + h["n"]].clone()
            why = self._check_digest(peer, h, staged)
        if not why:
            assert pool is not None
            dst = torch.as_tensor(np.asarray(h["blocks"][h["first"] : h["first"] + h["n"]], dtype=np.int64))
            pool[h["layer"], :, dst] = staged.transpose(0, 1)
        self._reply(peer, (f"ok {msg_id}" if not why else f"no {msg_id} {why}").encode())

    def _check(self, peer: str, h: dict[str, Any], pool: torch.Tensor | None, pool_epoch: int) -> str:
        """Why the staged layer of header ``h`` may not land, or "" (NOTE [ nixl path ]: which writes land)."""
        region = self._regions.get(peer)
        numbers = ("first", "n", "slot", "layer", "lease", "gen", "token")
        if not all(type(h[k]) is int for k in numbers):  # what lands below indexes with these very values
            raise TypeError(f"{', '.join(numbers)} must be integers")
        if not isinstance(h["digest"], str) or len(h["digest"]) != 2 * DIGEST_SIZE:
            raise TypeError(f"digest must be {2 * DIGEST_SIZE} hex digits")
        first, n, slot, blocks = h["first"], h["n"], h["slot"], h["blocks"]
        layer, i, gen, token = h["layer"], h["lease"], h["gen"], h["token"]
        if not isinstance(blocks, list) or not blocks or not all(type(b) is int for b in blocks):
            raise TypeError("blocks must be a non-empty list of integers")
        if region is None or not region.first <= slot <= slot + n <= region.first + REGION:
            return f"slots {slot}..{slot + n} are not in the staging region of {peer}"
        if not 0 <= layer < self.cfg.layers or not 0 <= i < self.leases.nslots:
            return f"layer {layer} or lease {i} out of range"
        if n <= 0 or first < 0 or first + n > len(blocks):
            return f"blocks {first}..{first + n} of a lease of {len(blocks)} blocks"
        if min(blocks) < 0 or max(blocks) >= self.cfg.device_blocks:
            return f"destination blocks {blocks[:8]} out of range 0..{self.cfg.device_blocks - 1}"
        lease = self.leases.read(i)
        if pool is None:
            return "the decode pool is cleared"
        if lease.value != LeaseState.GRANTED or lease.epoch != gen:
            return f"lease {i} is {lease.value.name} at generation {lease.epoch}, not GRANTED at {gen}"
        if lease.aux != pool_epoch:
            return f"lease {i} was granted on the pool of epoch {lease.aux}; the pool now is of {pool_epoch}"
        if not 0 <= token < 1 << 64 or lease_check(token, i, pool_epoch, blocks) != lease.epoch:
            return f"the token or the destination blocks are not those of lease {i}: refused"
        return ""

    def _check_digest(self, peer: str, h: dict[str, Any], staged: torch.Tensor) -> str:
        """Why ``staged`` (the copy that would land) is not what ``h`` vouches for, or "" (NOTE [ nixl path ]:
        which bytes land)."""
        if digest(staged) == h["digest"]:
            return ""
        return (
            f"the bytes in staging slots {h['slot']}..{h['slot'] + h['n']} are not those the header of {peer} "
            "vouches for (digest differs): a stale write of an earlier owner of the region came in, or the sender "
            "staged other bytes than it hashed; refused, nothing landed"
        )


class NixlLink:
    """The prefill messager's link to one remote decode instance, and its transport."""

    command_word = None  # nothing to sleep on: a remote instance has no futex words here

    def __init__(self, dest: str, rank: int, cfg: CacheConfig, endpoint: Endpoint | None) -> None:
        # dest: nixl://HOST:PORT/NAME (PORT: the decode instance's nixl_port; rank r listens on PORT + r)
        try:
            where, self.dest_name = dest.removeprefix("nixl://").split("/", 1)
            host, port = where.rsplit(":", 1)
            self.host, self.port = host, int(port) + rank
        except ValueError:
            raise MpkvError(f"bad destination {dest!r}: expected nixl://HOST:PORT/INSTANCE") from None
        if endpoint is None:
            raise MpkvError(
                f"cannot ship to {dest}: this prefill instance has no NIXL agent (launch it with --nixl-port PORT)"
            )
        self.dest, self.rank, self.cfg = dest, rank, cfg
        self.peer = agent_name(self.dest_name, rank)
        self.ep, self.agent = endpoint, endpoint.agent
        self.remote: dict[str, Any] | None = None
        self.dest_blocks = 0
        self._id = 0
        self._heard = 0.0  # when the receiver last answered us

    # -- the Link interface used by the messager ---------------------------------------------------------------------
    def open(self) -> NixlLink:
        self._fresh_region()
        return self

    def _fresh_region(self) -> None:
        """Hello (again) unless the receiver answered us within REGION_IDLE_S / 2: it may reclaim a region idle
        for REGION_IDLE_S, and a write into a reclaimed region could overwrite another sender's staged bytes."""
        if self.remote is not None and time.monotonic() - self._heard < REGION_IDLE_S / 2:
            return
        if self.remote is not None:
            self.remote = None
            self.agent.remove_remote_agent(self.peer)
        self._hello()

    def poll(self) -> str:
        return ""

    def broken(self) -> str:
        return ""

    def gone(self) -> str:
        return ""

    def _receiver(self) -> Peer:
        def heard() -> str:  # when the wait ends, not when it began
            return f"last answered {time.monotonic() - self._heard:.1f} s ago" if self._heard else "never answered"

        return Peer(f"NIXL agent {self.peer}", None, heard, absent=f"remote, at {self.host}:{self.port}")

    def _wait_notif(self, what: str, accept: Any) -> bytes:
        def answer() -> bytes | None:
            for msg in self.agent.get_new_notifs().get(self.peer, []):
                if msg == b"bye" and self.remote is not None:  # it reclaimed our region: hello before writing
                    self._heard = 0.0
                    raise MpkvError(f"{self.peer} reclaimed this sender's staging region while waiting for {what}")
                if accept(msg):
                    self._heard = time.monotonic()
                    return bytes(msg)
            return None

        try:
            return poll_until(answer, what=f"for the {what}", pace_s=0.0002, peer=self._receiver())
        except WaitTimeout:
            raise MpkvError(
                f"no {what} from NIXL agent {self.peer} at {self.host}:{self.port} within {REPLY_TIMEOUT_S:g} s "
                "(is the decode instance launched with --nixl-port, and alive?)"
            ) from None

    def _hello(self) -> None:
        try:
            self._handshake()
        except BaseException:
            try:  # not open: forget the receiver, so that a later hello starts afresh
                self.agent.remove_remote_agent(self.peer)
            except Exception:  # the bindings' own types: its metadata never came
                pass
            raise

    def _handshake(self) -> None:
        self.agent.fetch_remote_metadata(self.peer, self.host, self.port)
        self.agent.send_local_metadata(self.host, self.port)
        try:
            poll_until(
                lambda: self.agent.check_remote_metadata(self.peer) or None,
                what="for its metadata",
                pace_s=0.001,
                peer=self._receiver(),
            )
        except WaitTimeout:
            raise MpkvError(f"no metadata from NIXL agent {self.peer} at {self.host}:{self.port}") from None
        self.agent.send_notif(self.peer, b"hello")
        info = json.loads(self._wait_notif("answer to hello", lambda m: m.startswith(b"hi"))[2:])
        if "error" in info:
            raise MpkvError(f"{self.peer} refused this sender: {info['error']}")
        theirs = CacheConfig.from_json(json.dumps(info["config"]))
        from mpkv.pd.link import compatible  # the same geometry check as the same-host path

        why = compatible(self.cfg, theirs)
        if why:
            raise MpkvError(f"cannot ship KV into {self.dest}: {why}")
        self.remote, self.dest_blocks = info, theirs.device_blocks

    # -- the Transport interface -----------------------------------------------------------------------------------
    def write_layer(
        self,
        layer: int,
        src: torch.Tensor,
        src_blocks: np.ndarray,
        dst_blocks: np.ndarray,
        lease: tuple[int, int, int],
    ) -> None:
        self._fresh_region()
        assert self.remote is not None
        region = self.remote["slots"]
        for i in range(0, len(src_blocks), region):
            self._fresh_region()
            assert self.remote is not None
            s = src_blocks[i : i + region]
            n = len(s)
            self.ep.staging[:n] = src[layer, :, torch.as_tensor(s)].transpose(0, 1)
            header: dict[str, Any] = {"lease": lease[0], "gen": lease[1], "token": lease[2], "layer": layer}
            header |= {"slot": self.remote["slot"], "blocks": [int(x) for x in dst_blocks], "first": i, "n": n}
            header["digest"] = digest(self.ep.staging[:n])
            self.write_staged(n, header)

    def write_staged(self, n: int, header: dict[str, Any]) -> None:
        """WRITE the first ``n`` slots of our staging into our region of the receiver's, with ``header`` (which
        carries their digest); return once the receiver landed them, or raise with its reason."""
        assert self.remote is not None
        self._id += 1
        header = {**header, "id": self._id}
        nbytes = n * self.ep.slot_bytes
        local = self.agent.get_xfer_descs([(self.ep.addr, nbytes, 0)], "DRAM")
        remote = self.agent.get_xfer_descs([(self.remote["addr"], nbytes, 0)], "DRAM")
        handle = self.agent.initialize_xfer("WRITE", local, remote, self.peer, b"w" + json.dumps(header).encode())
        state = self.agent.transfer(handle)

        def landed() -> str | None:
            now = self.agent.check_xfer_state(handle)
            return None if now == "PROC" else str(now)

        try:
            if state == "PROC":
                what = f"for the write of layer {header.get('layer')} to land"
                state = poll_until(landed, what=what, pace_s=0.00005, peer=self._receiver())
        except WaitTimeout:  # still in flight: its handle is left to NIXL rather than released under it
            raise MpkvError(f"NIXL write to {self.peer} still in flight after {REPLY_TIMEOUT_S:g} s") from None
        self.agent.release_xfer_handle(handle)
        if state != "DONE":
            raise MpkvError(f"NIXL write to {self.peer} ended in state {state}")
        want = f"{self._id}".encode()
        reply = self._wait_notif("acknowledgement", lambda m, want=want: m.split(b" ")[1:2] == [want])
        if reply.startswith(b"no"):
            raise MpkvError(f"{self.peer} refused layer {header.get('layer')}: {reply.split(b' ', 2)[2].decode()}")

    def flush(self) -> None:
        """Every write was acknowledged before write_layer returned."""

    def close(self) -> None:
        """Say bye (the receiver frees our region at once), then forget the receiver."""
        if self.remote is not None:
            self.remote = None
            try:
                self.agent.send_notif(self.peer, b"bye")
            finally:
                self.agent.remove_remote_agent(self.peer)
