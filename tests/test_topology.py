"""The instance's shape as a table (mpkv.topology), checked for every role and tensor-parallel degree: one writer per
shared word (invariant I1), dense and distinct ring readers, and the slot arithmetic the processes use."""

from __future__ import annotations

import itertools

import pytest

from mpkv import topology
from mpkv.config import CacheConfig
from mpkv.layout import SegmentKind
from mpkv.protocol import ROLES, PdRole, PoolOwner, actor_name, actor_slot
from mpkv.topology import Topology

CONFIGS = [
    CacheConfig(tp=tp, kv_heads=2 * tp, pd_role=pd, pool_owner=owner)
    for tp, pd, owner in itertools.product(range(1, 9), PdRole, PoolOwner)
]


def _id(cfg: CacheConfig) -> str:
    return f"tp{cfg.tp}-{cfg.pd_role.name.lower()}-{cfg.pool_owner.name.lower()}"


@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
def test_every_word_has_one_writer_and_readers_are_dense(cfg: CacheConfig) -> None:
    topo = Topology.of(cfg)
    tp = cfg.tp
    actors = {actor_name(role, rank) for role in ROLES for rank in range(tp)}
    known = actors | {"launcher", "controller", "client", "allocator"}
    names = [o.obj for o in topo.objects]
    assert len(names) == len(set(names)), f"an object is listed twice: {names}"
    for o in topo.objects:
        # One writer per slot, record or ring: a single name, a process that exists in this configuration.
        assert o.writers and all(isinstance(w, str) and w for w in o.writers), o
        for w in o.writers:
            assert w in known or (o.obj == "links" and w.startswith("link ")), f"{o.obj}: unknown writer {w!r}"
        if o.kind == SegmentKind.RING:
            assert len(o.writers) == 1, f"ring {o.obj} has writers {o.writers}"
            assert len(o.readers) == len(set(o.readers)) >= 1, f"ring {o.obj}: readers {o.readers}"
            assert o.writers[0] not in o.readers, f"ring {o.obj}: its writer reads it too"
    # The slot arithmetic the processes use agrees with the table.
    status, waits, errors = topo["status"], topo["waits"], topo["errors"]
    assert len(status.writers) == topology.status_slot_count(tp)
    assert status.writers[topology.launcher_slot(tp)] == "launcher"
    assert waits.writers[topology.controller_wait_slot(tp)] == "controller"
    for role in ROLES:
        for rank in range(tp):
            me = actor_name(role, rank)
            slot = actor_slot(role, rank)
            assert status.writers[slot] == waits.writers[slot] == errors.writers[slot] == me
            if topology.reads_tasks(cfg, role):
                ring = topo[f"tasks.{topology.task_ring_of(role).name.lower()}"]
                assert ring.readers[topology.task_reader(tp, role, rank)] == me
                assert topo[f"done.{role.name.lower()}.r{rank}"].writers == (me,)
            else:
                assert f"done.{role.name.lower()}.r{rank}" not in topo
    owner = topology.pool_owner(cfg)
    assert topo["handles"].writers == tuple(actor_name(owner, r) for r in range(tp))
    assert owner not in topology.pool_attachers(cfg) and len(topology.pool_attachers(cfg)) == len(ROLES) - 1
    # Every ring reader of this instance is one of its actors or the client; every actor that reads reads once.
    readers = [r for o in topo.objects if o.kind == SegmentKind.RING and o.obj.startswith("tasks.") for r in o.readers]
    assert len(readers) == len(set(readers)) and set(readers) <= actors
    if cfg.pd_role == PdRole.DECODE:
        links = topo["links"]
        for j in range(topology.MAX_LINKS):
            for rank in range(tp):
                assert links.writers[topology.link_slot(tp, j, rank)] == f"link {j} r{rank}"
        assert set(topo["leases"].writers) == {"allocator"}
    else:
        assert "links" not in topo and "leases" not in topo
    assert ("sendbar" in topo) == ("progress" in topo) == (cfg.pd_role == PdRole.PREFILL)


@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
def test_each_actor_finds_its_endpoints_in_the_table(cfg: CacheConfig) -> None:
    """What an actor and the client open (Topology.actor, Topology.done_rings) is read off the same table: every
    ring reader and every completion ring belongs to exactly one actor, and the handshake's peers are each
    other's: an owner waits on its rank's attachers, each attacher on its rank's owner."""
    topo = Topology.of(cfg)
    readers_seen: set[tuple[str, int]] = set()
    done_seen: set[str] = set()
    owner = topology.pool_owner(cfg)
    for role in ROLES:
        for rank in range(cfg.tp):
            ends = topo.actor(role, rank)
            assert ends.name == actor_name(role, rank) and ends.slot == actor_slot(role, rank)
            if ends.tasks is None:
                assert ends.done is None and not topology.reads_tasks(cfg, role)
            else:
                assert topo[ends.tasks].readers[ends.reader] == ends.name
                assert ends.done is not None and topo[ends.done].writers == (ends.name,)
                assert topo["control"].writers[ends.fence] == "controller" and ends.fence >= 2
                readers_seen.add((ends.tasks, ends.reader))
                done_seen.add(ends.done)
            if role == owner:
                assert sorted(ends.peers) == sorted(actor_slot(r, rank) for r in topology.pool_attachers(cfg))
                links = topo["links"].writers if "links" in topo else ()
                into_me = [f"link {j} r{rank}" for j in range(topology.MAX_LINKS)] if links else []
                assert [links[s] for s in ends.links] == into_me
            else:
                assert ends.peers == (actor_slot(owner, rank),) and ends.links == ()
    every_reader = {(o.obj, i) for o in topo.rings() if o.writers == ("client",) for i in range(len(o.readers))}
    assert readers_seen == every_reader, "a task ring reader no actor takes, or one taken twice"
    assert (
        done_seen
        == {o.obj for o in topo.done_rings().values()}
        == {o.obj for o in topo.rings() if o.readers == ("client",)}
    )
