"""PD across hosts over NIXL (the optional extra ``mpkv[nixl]``; UCX moves host memory, so it runs without a GPU).

NOTE [ nixl path ]
A remote sender cannot take part in the decode instance's shared-memory handshake, and a one-sided write that
arrives after a clear could land in whatever memory replaced the pool. So remote bytes never go into the pool
directly: the decode messager r (an ordinary attacher of its rank's pool, covered by the handshake) owns a
staging buffer registered with its NIXL agent for its whole life, and it alone copies staged blocks into the pool,
after checking the lease. Per rank:

    receiver  decode messager r: agent "mpkv.<decode>.r<r>", listening on nixl_port + r; staging of SLOTS slots
              (a slot = one block's K and V of one layer), split into SENDERS regions: each sender gets its own
              region at hello and may write nowhere else (regions are kept by agent name, never reassigned).
    sender    prefill messager r: agent "mpkv.<prefill>.r<r>", listening on its instance's nixl_port + r (the
              receiver fetches its metadata from there), with a staging buffer of its own to write from.
    hello     sender: fetch the receiver's metadata, push its own, notify b"hello"; the receiver answers with
              the sender's staging region and its instance's config (for the geometry check).
    a layer   sender: copy the blocks' K/V into its staging, WRITE them into the receiver's staging with the
              notification b"w" + header (message id, lease slot, lease generation, layer, destination blocks);
              the receiver checks the lease (GRANTED, that generation, granted on the pool it maps now), copies
              staging -> pool, answers b"ok <id>" or b"no <id> <reason>". One message in flight per sender.
Every wait has a deadline and names the agent it waited for. Nothing here is a protocol of its own beyond that
header: NIXL moves the bytes and delivers the notifications.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

import numpy as np
import torch

from mpkv.config import CacheConfig
from mpkv.errors import MpkvError
from mpkv.protocol import LeaseState

SLOTS = 256
SENDERS = 4  # a receiver's staging is split into SENDERS regions of SLOTS // SENDERS slots, one per sender
REGION = SLOTS // SENDERS
REPLY_TIMEOUT_S = 30.0


class NixlUnavailable(MpkvError):
    """NIXL is not installed (pip install 'mpkv[nixl]'), or could not start an agent."""


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
    return f"mpkv.{instance}.r{rank}"


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


class Receiver:
    """The decode messager's side. ``poll`` answers hellos and lands staged layers; call it often."""

    def __init__(self, endpoint: Endpoint, cfg: CacheConfig, leases: Any) -> None:
        self.cfg, self.leases, self.ep = cfg, leases, endpoint
        self.agent = endpoint.agent
        self._hellos: set[str] = set()
        self._regions: dict[str, int] = {}  # sender agent -> first slot of its staging region
        self.last_active = 0.0

    def poll(self, pool: torch.Tensor | None, pool_epoch: int) -> None:
        for peer, msgs in self.agent.get_new_notifs().items():
            self.last_active = time.monotonic()
            for msg in msgs:
                if msg == b"hello":
                    self._hellos.add(peer)
                elif msg.startswith(b"w"):
                    self._land(peer, msg[1:], pool, pool_epoch)
        for peer in list(self._hellos):
            if self.agent.check_remote_metadata(peer):  # its pushed metadata has arrived: we can answer
                self._hellos.discard(peer)
                self.agent.send_notif(peer, b"hi" + json.dumps(self._region_for(peer)).encode())

    def _region_for(self, peer: str) -> dict[str, Any]:
        """Each sender writes only into its own region: two senders never overwrite each other's staged bytes."""
        if peer not in self._regions:
            taken = set(self._regions.values())
            free = [r * REGION for r in range(SENDERS) if r * REGION not in taken]
            if not free:
                return {"error": f"{self.ep.name} already serves {SENDERS} senders: {sorted(self._regions)}"}
            self._regions[peer] = free[0]
        first = self._regions[peer]
        addr = self.ep.addr + first * self.ep.slot_bytes
        return {"addr": addr, "slot": first, "slots": REGION, "config": json.loads(self.cfg.to_json())}

    def _land(self, peer: str, raw: bytes, pool: torch.Tensor | None, pool_epoch: int) -> None:
        try:
            h = json.loads(raw)
            why = self._check(peer, h, pool, pool_epoch)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            self.agent.send_notif(peer, f"no ? malformed header: {type(e).__name__}: {e}".encode())
            return
        if not why:
            assert pool is not None
            dst = torch.as_tensor(np.asarray(h["dst"], dtype=np.int64))
            staged = self.ep.staging[h["slot"] : h["slot"] + len(dst)]
            pool[h["layer"], :, dst] = staged.transpose(0, 1)
        reply = f"ok {h['id']}" if not why else f"no {h['id']} {why}"
        self.agent.send_notif(peer, reply.encode())

    def _check(self, peer: str, h: dict[str, Any], pool: torch.Tensor | None, pool_epoch: int) -> str:
        """Why the staged layer of header ``h`` may not land, or ""."""
        first = self._regions.get(peer)
        n = len(h["dst"])
        if first is None or not first <= h["slot"] <= h["slot"] + n <= first + REGION:
            return f"slots {h['slot']}..{h['slot'] + n} are not in the staging region of {peer}"
        if not 0 <= h["layer"] < self.cfg.layers or not 0 <= h["lease"] < self.leases.nslots:
            return f"layer {h['layer']} or lease {h['lease']} out of range"
        lease = self.leases.read(h["lease"])
        if pool is None:
            return "the decode pool is cleared"
        if lease.value != LeaseState.GRANTED or lease.epoch != h["gen"]:
            return f"lease {h['lease']} is {lease.value.name} at generation {lease.epoch}, not GRANTED at {h['gen']}"
        if lease.aux != pool_epoch:
            return f"lease {h['lease']} was granted on the pool of epoch {lease.aux}; the pool now is of {pool_epoch}"
        dst = h["dst"]
        if n == 0 or min(dst) < 0 or max(dst) >= self.cfg.device_blocks:
            return f"destination blocks {dst[:8]} out of range 0..{self.cfg.device_blocks - 1}"
        return ""


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

    # -- the Link interface used by the messager ---------------------------------------------------------------------
    def open(self) -> NixlLink:
        if self.remote is None:
            self._hello()
        return self

    def poll(self) -> str:
        return ""

    def broken(self) -> str:
        return ""

    def gone(self) -> str:
        return ""

    def _wait_notif(self, what: str, accept: Any) -> bytes:
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while time.monotonic() < deadline:
            for msg in self.agent.get_new_notifs().get(self.peer, []):
                if accept(msg):
                    return bytes(msg)
            time.sleep(0.0002)  # polling NIXL (no progress thread): a bounded poll, not a synchronization
        raise MpkvError(
            f"no {what} from NIXL agent {self.peer} at {self.host}:{self.port} within {REPLY_TIMEOUT_S:g} s "
            "(is the decode instance launched with --nixl-port, and alive?)"
        )

    def _hello(self) -> None:
        self.agent.fetch_remote_metadata(self.peer, self.host, self.port)
        self.agent.send_local_metadata(self.host, self.port)
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while not self.agent.check_remote_metadata(self.peer):
            if time.monotonic() > deadline:
                raise MpkvError(f"no metadata from NIXL agent {self.peer} at {self.host}:{self.port}")
            time.sleep(0.001)
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
        self, layer: int, src: torch.Tensor, src_blocks: np.ndarray, dst_blocks: np.ndarray, lease: tuple[int, int]
    ) -> None:
        assert self.remote is not None
        region = self.remote["slots"]
        for i in range(0, len(src_blocks), region):
            s, d = src_blocks[i : i + region], dst_blocks[i : i + region]
            n = len(s)
            self.ep.staging[:n] = src[layer, :, torch.as_tensor(s)].transpose(0, 1)
            self._id += 1
            header: dict[str, Any] = {"id": self._id, "lease": lease[0], "gen": lease[1], "layer": layer}
            header["slot"] = self.remote["slot"]
            header["dst"] = [int(x) for x in d]
            nbytes = n * self.ep.slot_bytes
            local = self.agent.get_xfer_descs([(self.ep.addr, nbytes, 0)], "DRAM")
            remote = self.agent.get_xfer_descs([(self.remote["addr"], nbytes, 0)], "DRAM")
            handle = self.agent.initialize_xfer("WRITE", local, remote, self.peer, b"w" + json.dumps(header).encode())
            state = self.agent.transfer(handle)
            deadline = time.monotonic() + REPLY_TIMEOUT_S
            while state == "PROC" and time.monotonic() < deadline:
                time.sleep(0.00005)  # pacing a bounded poll of NIXL (no progress thread), yielding the core
                state = self.agent.check_xfer_state(handle)
            if state == "PROC":  # still in flight: its handle is left to NIXL rather than released under it
                raise MpkvError(f"NIXL write to {self.peer} still in flight after {REPLY_TIMEOUT_S:g} s")
            self.agent.release_xfer_handle(handle)
            if state != "DONE":
                raise MpkvError(f"NIXL write to {self.peer} ended in state {state}")
            want = f"{self._id}".encode()
            reply = self._wait_notif("acknowledgement", lambda m, want=want: m.split(b" ")[1] == want)
            if reply.startswith(b"no"):
                raise MpkvError(f"{self.peer} refused layer {layer}: {reply.split(b' ', 2)[2].decode()}")

    def flush(self) -> None:
        """Every write was acknowledged before write_layer returned."""

    def close(self) -> None:
        if self.remote is not None:
            self.agent.remove_remote_agent(self.peer)
