"""Model check of the clear/restore handshake (NOTE [ clear handshake ] in mpkv.handshake).

Explores every interleaving of the controller, the pool owner and up to three attachers, driving the same
``decide`` and ``check_command`` functions the real actors and controller run, with at most one crash
injected at every reachable point. Links (prefill messagers mapping a decode pool from outside, NOTE [ links ]
in mpkv.pd.link) join as attachers the controller never waits for: at any point they may announce themselves
and map the pool if ``link_may_map`` allows, and they let go when ``link_must_unmap`` says so. Asserts in every
reachable state:
  - no use after free: an actor that maps the pool maps the live pool of the current generation;
  - the pool is freed only when every live attacher has detached, and never allocated twice;
  - the wait-for relation has no cycle;
  - no deadlock: some transition is enabled unless the run ended, and from every state an end is reachable;
  - every end is either a clean shutdown without a crash, or a named error naming a crashed/failed actor.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace

import pytest

from mpkv.handshake import Act, Command, Status, View, check_command, decide, link_may_map, link_must_unmap
from mpkv.protocol import ACK_OF, ActorState, ClearFlags, Cmd

S = ActorState
BOTH = int(ClearFlags.DEVICE | ClearFlags.HOST)
SCRIPT = (
    (Cmd.PAUSE, 0),
    (Cmd.CLEAR, BOTH),
    (Cmd.RESTORE, 2),
    (Cmd.RESUME, 0),
    (Cmd.PAUSE, 0),
    (Cmd.CLEAR, int(ClearFlags.DEVICE)),
    (Cmd.RESTORE, 3),
    (Cmd.SHUTDOWN, 0),
)


@dataclass(frozen=True)
class Actor:
    status: Status
    alive: bool = True
    mapped: bool = False
    gen: int = 0  # generation of the pool it maps
    owns_host: bool = False
    host_live: bool = False
    link: bool = False  # a link: not spawned by the instance, not acknowledged to the controller
    announced: bool = False  # a link between its announcement (BOOTING@E) and its check
    opens_left: int = 0  # how many times a link may still try to map (keeps the state space finite)


@dataclass(frozen=True)
class World:
    step: int  # index into SCRIPT of the command being waited for; -1 = start-up
    cmd: Command
    actors: tuple[Actor, ...]  # [0] is the owner
    pool_live: bool = False
    pool_gen: int = 0
    crashes: int = 0
    end: str = ""  # "" running, "done", or "error: ..."
    cleared: int = 0
    weight_version: int = 1


ANNOUNCE_FIRST = True  # the links protocol; a sanity test turns it off and expects a use-after-free


def link_step(w: World, i: int) -> World:
    """Link i's next step, if any: announce, check-and-map, or let go (the same rules as mpkv.pd.link.Link).
    With ANNOUNCE_FIRST off it checks first and announces only when it maps (the broken order)."""
    a, owner = w.actors[i], w.actors[0]
    owner_status = owner.status if owner.alive and owner.status.state != S.FAILED else None
    new = a
    if a.mapped and link_must_unmap(w.cmd):
        new = replace(a, mapped=False, status=Status(S.STOPPED, w.cmd.epoch))
    elif a.announced and ANNOUNCE_FIRST:  # announced earlier: check now, then map or stand down
        if link_may_map(w.cmd, owner_status):
            if not w.pool_live:
                raise Violation(f"link {i} mapped a freed pool")
            new = replace(a, mapped=True, gen=w.pool_gen, announced=False, status=Status(S.READY, w.cmd.epoch))
        else:
            new = replace(a, announced=False, status=Status(S.STOPPED, w.cmd.epoch))
    elif a.announced:  # checked earlier: map and announce now, whatever happened since
        if not w.pool_live:
            raise Violation(f"link {i} mapped a freed pool")
        new = replace(a, mapped=True, gen=w.pool_gen, announced=False, status=Status(S.READY, w.cmd.epoch))
    elif not a.mapped and a.opens_left:
        if ANNOUNCE_FIRST:
            new = replace(a, announced=True, opens_left=a.opens_left - 1, status=Status(S.BOOTING, w.cmd.epoch))
        elif link_may_map(w.cmd, owner_status):
            new = replace(a, announced=True, opens_left=a.opens_left - 1)
    return w if new == a else replace(w, actors=w.actors[:i] + (new,) + w.actors[i + 1 :])


def view(w: World, i: int) -> View:
    a = w.actors[i]
    if i == 0:
        peers = tuple(p.status if p.alive else None for p in w.actors[1:])
    else:
        owner = w.actors[0]
        peers = (owner.status if owner.alive else None,)
    return View(a.status, w.cmd, i == 0, a.mapped, a.owns_host, a.host_live, peers)


class Violation(AssertionError):
    pass


def apply(w: World, i: int) -> tuple[World, tuple[int, ...]]:
    """Actor i takes its next step. Returns the new world and whom it waits for (actor indexes), if waiting."""
    a = w.actors[i]
    if a.link:
        return link_step(w, i), ()
    d = decide(view(w, i))
    if d.action == Act.WAIT:
        return w, tuple((0 if i else j + 1) for j in d.waiting_for)
    pool_live, pool_gen = w.pool_live, w.pool_gen
    new = a
    if d.action == Act.ALLOCATE:
        if pool_live:
            raise Violation(f"owner allocated a second pool while generation {pool_gen} is live (a leak)")
        pool_live, pool_gen = True, pool_gen + 1
        new = replace(a, mapped=True, gen=pool_gen)
    elif d.action == Act.FREE:
        for j, p in enumerate(w.actors[1:], 1):
            if p.alive and p.mapped:
                raise Violation(f"owner freed the pool while {'link' if p.link else 'attacher'} {j} still maps it")
        pool_live = False
        new = replace(a, mapped=False)
    elif d.action == Act.ATTACH:
        if not pool_live:
            raise Violation(f"attacher {i} attached to a freed pool")
        new = replace(a, mapped=True, gen=pool_gen)
    elif d.action == Act.DETACH:
        new = replace(a, mapped=False)
    elif d.action == Act.RELEASE_HOST:
        new = replace(a, host_live=False)
    elif d.action == Act.RESTORE_HOST:
        new = replace(a, host_live=True)
    elif d.action == Act.FAIL:
        assert d.reason, "a failure must carry its reason"
        new = replace(a, mapped=False, status=Status(S.FAILED, a.status.epoch))  # runtime detaches in finally
    if d.publish is not None and d.action != Act.FAIL:
        assert d.publish != a.status or new != a, f"actor {i} took a step that changes nothing: {d}"
        new = replace(new, status=d.publish)
    actors = w.actors[:i] + (new,) + w.actors[i + 1 :]
    return replace(w, actors=actors, pool_live=pool_live, pool_gen=pool_gen), ()


def controller(w: World) -> tuple[World | None, tuple[int, ...]]:
    """The controller's next step (None: nothing to do yet) and whom it waits for."""
    bad = [i for i, a in enumerate(w.actors) if not a.link and (not a.alive or a.status.state == S.FAILED)]
    if bad:
        who = ", ".join(f"actor {i} ({'dead' if not w.actors[i].alive else 'FAILED'})" for i in bad)
        return replace(w, end=f"error: {who} during {w.cmd.kind.name}@{w.cmd.epoch}"), ()
    target = ACK_OF[w.cmd.kind]
    waiting = tuple(i for i, a in enumerate(w.actors) if not a.link and not a.status.at_least(target, w.cmd.epoch))
    if waiting:
        return None, waiting
    if w.cmd.kind == Cmd.SHUTDOWN:
        return replace(w, end="done"), ()
    kind, aux = SCRIPT[w.step + 1]
    refusal = check_command(kind, aux, w.cmd, ClearFlags(w.cleared), w.weight_version)
    assert refusal is None, f"the script's {kind.name} was refused: {refusal.message}"
    cleared, wv = w.cleared, w.weight_version
    if kind == Cmd.CLEAR:
        cleared |= aux
    if kind == Cmd.RESTORE:
        cleared, wv = 0, aux
    return replace(w, step=w.step + 1, cmd=Command(kind, w.cmd.epoch + 1, aux), cleared=cleared, weight_version=wv), ()


def check_state(w: World) -> None:
    for i, a in enumerate(w.actors):
        if a.alive and a.mapped and not (w.pool_live and a.gen == w.pool_gen):
            raise Violation(f"actor {i} maps pool generation {a.gen}, live={w.pool_live} gen={w.pool_gen}: stale view")


def successors(w: World, max_crashes: int) -> tuple[list[World], dict[int, tuple[int, ...]]]:
    out: list[World] = []
    waits: dict[int, tuple[int, ...]] = {}
    ctl, ctl_waits = controller(w)
    if ctl is not None:
        out.append(ctl)
    else:
        waits[-1] = ctl_waits
    for i, a in enumerate(w.actors):
        if not a.alive:
            continue
        nw, on = apply(w, i)
        if nw is not w:
            out.append(nw)
        elif on:
            waits[i] = on
        if w.crashes < max_crashes:
            dead = replace(a, alive=False, mapped=False)
            out.append(replace(w, actors=w.actors[:i] + (dead,) + w.actors[i + 1 :], crashes=w.crashes + 1))
    return out, waits


def assert_acyclic(waits: dict[int, tuple[int, ...]], w: World) -> None:
    state: dict[int, int] = {}

    def visit(n: int, path: list[int]) -> None:
        if state.get(n) == 1:
            raise Violation(f"wait-for cycle {[*path, n]} in {w}")
        if state.get(n) == 2:
            return
        state[n] = 1
        for m in waits.get(n, ()):
            visit(m, [*path, n])
        state[n] = 2

    for n in waits:
        visit(n, [])


def explore(n_attachers: int, owner_has_host: bool, max_crashes: int = 1, n_links: int = 0, opens: int = 2) -> int:
    actors = [Actor(Status(S.BOOTING, 0)) for _ in range(n_attachers + 1)]
    actors += [Actor(Status(S.STOPPED, 0), link=True, opens_left=opens) for _ in range(n_links)]
    host_holder = 0 if owner_has_host else 1
    actors[host_holder] = replace(actors[host_holder], owns_host=True)
    start = World(step=-1, cmd=Command(Cmd.NONE, 0), actors=tuple(actors))
    seen = {start: 0}
    edges: dict[World, list[World]] = {}
    todo = deque([start])
    while todo:
        w = todo.popleft()
        check_state(w)
        if w.end:
            if w.end == "done":
                assert w.crashes == 0 or all(a.status.state == S.STOPPED for a in w.actors if a.alive and not a.link)
                assert not any(a.alive and a.mapped for a in w.actors), f"a link still maps the pool at the end: {w}"
            else:
                assert "dead" in w.end or "FAILED" in w.end, w.end
            edges[w] = []
            continue
        nexts, waits = successors(w, max_crashes)
        if not nexts:
            raise Violation(f"deadlock: nothing can happen in {w}; waits: {waits}")
        assert_acyclic(waits, w)
        edges[w] = nexts
        for n in nexts:
            if n not in seen:
                seen[n] = 0
                todo.append(n)
    # From every state some end is reachable (no livelock, no wait without end).
    rev: dict[World, list[World]] = {w: [] for w in edges}
    for w, ns in edges.items():
        for n in ns:
            rev[n].append(w)
    can_end = {w for w in edges if w.end}
    todo = deque(can_end)
    while todo:
        for p in rev[todo.popleft()]:
            if p not in can_end:
                can_end.add(p)
                todo.append(p)
    stuck = [w for w in edges if w not in can_end]
    assert not stuck, f"{len(stuck)} states can never end, e.g. {stuck[0]}"
    return len(seen)


@pytest.mark.parametrize("owner_has_host", [False, True], ids=["worker-owns-pool", "transfer-owns-pool"])
@pytest.mark.parametrize("n_attachers", [1, 2, 3])
def test_every_interleaving_with_a_crash_anywhere(n_attachers: int, owner_has_host: bool) -> None:
    n = explore(n_attachers, owner_has_host)
    print(
        f"[model] owner + {n_attachers} attachers, host pool on the {'owner' if owner_has_host else 'attacher'}: "
        f"{n} states explored, no violation"
    )
    assert n > 100


def test_the_reference_handshake_is_caught() -> None:
    """Sanity check of the checker: the seed's rule (owner and attacher both wait for each other's zero) must be
    reported as a deadlock, so a pass above means something."""
    import mpkv.handshake as hs

    original = hs.decide

    def reference(v: View) -> hs.Decision:
        d = original(v)
        if v.cmd.kind == Cmd.CLEAR and not v.is_owner and d.action == Act.DETACH:
            owner = v.peers[0]
            if owner is not None and not owner.at_least(S.DETACHED, v.cmd.epoch):
                return hs.Decision(Act.WAIT, waiting_for=(0,))  # "wait until the owner has cleared"
        return d

    globals()["decide"] = reference
    try:
        with pytest.raises(Violation, match="wait-for cycle|deadlock"):
            explore(1, owner_has_host=False, max_crashes=0)
    finally:
        globals()["decide"] = original


def test_freeing_without_waiting_is_caught() -> None:
    """Sanity check: an owner that frees without waiting for its attachers (the 'cleanup in one branch' family)
    must be reported as a use-after-free."""
    import mpkv.handshake as hs

    original = hs.decide

    def hasty(v: View) -> hs.Decision:
        d = original(v)
        if v.is_owner and d.action == Act.WAIT and v.cmd.kind == Cmd.CLEAR:
            return hs.Decision(Act.FREE, Status(S.DETACHED, v.cmd.epoch))
        return d

    globals()["decide"] = hasty
    try:
        with pytest.raises(Violation, match="freed the pool while attacher 1 still maps it"):
            explore(1, owner_has_host=False, max_crashes=0)
    finally:
        globals()["decide"] = original


@pytest.mark.parametrize(("n_attachers", "n_links", "opens"), [(1, 1, 2), (2, 1, 2), (1, 2, 1)])
def test_links_into_a_decode_pool(n_attachers: int, n_links: int, opens: int) -> None:
    """Links map the pool at any moment (``opens`` times each), across clears and restores, with a crash
    anywhere."""
    n = explore(n_attachers, owner_has_host=False, n_links=n_links, opens=opens)
    print(
        f"[model] owner + {n_attachers} attachers + {n_links} links mapping up to {opens} times each: "
        f"{n} states explored, no violation"
    )
    assert n > 100


def test_a_link_that_checks_before_announcing_is_caught() -> None:
    """Sanity check of NOTE [ links ]: a link that checks the command and then maps, without announcing itself
    first, can map a pool the owner is freeing: the checker must find that interleaving."""
    globals()["ANNOUNCE_FIRST"] = False
    try:
        with pytest.raises(Violation, match="freed the pool while link|mapped a freed pool|stale view"):
            explore(1, owner_has_host=False, max_crashes=0, n_links=1)
    finally:
        globals()["ANNOUNCE_FIRST"] = True
