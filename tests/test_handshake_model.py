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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import pytest

from mpkv.handshake import (
    Act,
    Command,
    Decision,
    Status,
    View,
    check_command,
    decide,
    link_may_map,
    link_must_unmap,
    settled_ledger,
    step_done,
)
from mpkv.protocol import ACK_OF, ActorState, ClearFlags, Cmd

S = ActorState
BOTH = int(ClearFlags.DEVICE | ClearFlags.HOST)
WEIGHTS = int(ClearFlags.WEIGHTS)
SCRIPT = (
    (Cmd.PAUSE, 0),
    (Cmd.CLEAR, BOTH | WEIGHTS),
    (Cmd.RESTORE, 2),
    (Cmd.RESUME, 0),
    (Cmd.PAUSE, 0),
    (Cmd.CLEAR, WEIGHTS),
    (Cmd.RESTORE, 2),  # the same version: the workers load the weights they cleared
    (Cmd.CLEAR, int(ClearFlags.DEVICE)),
    (Cmd.RESTORE, 3),
    (Cmd.SHUTDOWN, 0),
)


@dataclass(frozen=True)
class Actor:
    status: Status
    rank: int = 0
    alive: bool = True
    mapped: bool = False
    gen: int = 0  # generation of the pool it maps
    version: int = 1  # the weight version it serves (adopted with the pool it maps)
    owns_host: bool = False
    host_live: bool = False
    owns_weights: bool = False  # the worker: it holds the model's weights
    weights_live: bool = False
    weights_version: int = -1  # the version whose weights it holds
    link: bool = False  # a link: not spawned by the instance, not acknowledged to the controller
    announced: bool = False  # a link between its announcement (BOOTING@E) and its check
    opens_left: int = 0  # how many times a link may still try to map (keeps the state space finite)


@dataclass(frozen=True)
class Pool:
    live: bool = False
    gen: int = 0
    version: int = 0


@dataclass(frozen=True)
class World:
    step: int  # commands issued so far (SCRIPT: index of the command being waited for); -1 = start-up
    cmd: Command
    actors: tuple[Actor, ...]  # per rank: [owner, attachers...]; links last (they map rank 0's pool)
    pools: tuple[Pool, ...]  # per rank
    per_rank: int  # actors per rank (owner + attachers)
    crashes: int = 0
    timeouts: int = 0  # steps the controller gave up on
    end: str = ""  # "" running, "done", or "error: ..."
    cleared: int = 0  # the controller's ledger
    weight_version: int = 1


ANNOUNCE_FIRST = True  # the links protocol; a sanity test turns it off and expects a use-after-free


def set_actor(w: World, i: int, a: Actor, **changes: object) -> World:
    return replace(w, actors=w.actors[:i] + (a,) + w.actors[i + 1 :], **changes)  # type: ignore[arg-type]


def set_pool(w: World, rank: int, pool: Pool) -> tuple[Pool, ...]:
    return w.pools[:rank] + (pool,) + w.pools[rank + 1 :]


def link_step(w: World, i: int) -> World:
    """Link i's next step, if any: announce, check-and-map, or let go (the same rules as mpkv.pd.link.Link).
    With ANNOUNCE_FIRST off it checks first and announces only when it maps (the broken order)."""
    a, owner, pool = w.actors[i], w.actors[0], w.pools[0]
    owner_status = owner.status if owner.alive and owner.status.state != S.FAILED else None
    mapped = replace(a, mapped=True, gen=pool.gen, announced=False, status=Status(S.READY, w.cmd.epoch))
    new = a
    if a.mapped and link_must_unmap(w.cmd):
        new = replace(a, mapped=False, status=Status(S.STOPPED, w.cmd.epoch))
    elif a.announced and ANNOUNCE_FIRST:  # announced earlier: check now, then map or stand down
        if link_may_map(w.cmd, owner_status):
            if not pool.live:
                raise Violation(f"link {i} mapped a freed pool")
            new = mapped
        else:
            new = replace(a, announced=False, status=Status(S.STOPPED, w.cmd.epoch))
    elif a.announced:  # checked earlier: map and announce now, whatever happened since
        if not pool.live:
            raise Violation(f"link {i} mapped a freed pool")
        new = mapped
    elif not a.mapped and a.opens_left:
        if ANNOUNCE_FIRST:
            new = replace(a, announced=True, opens_left=a.opens_left - 1, status=Status(S.BOOTING, w.cmd.epoch))
        elif link_may_map(w.cmd, owner_status):
            new = replace(a, announced=True, opens_left=a.opens_left - 1)
    return w if new == a else set_actor(w, i, new)


def peer_indexes(w: World, i: int) -> tuple[int, ...]:
    """The actors whose statuses actor i's View carries, in order: an owner's attachers (rank 0's: and links),
    an attacher's owner."""
    rank, base = w.actors[i].rank, w.actors[i].rank * w.per_rank
    if i != base:
        return (base,)
    links = tuple(j for j, a in enumerate(w.actors) if a.link) if rank == 0 else ()
    return tuple(range(base + 1, base + w.per_rank)) + links


def view(w: World, i: int) -> View:
    a = w.actors[i]
    peers = tuple(w.actors[j].status if w.actors[j].alive else None for j in peer_indexes(w, i))
    is_owner = i == a.rank * w.per_rank
    return View(
        a.status, w.cmd, is_owner, a.mapped, a.version, a.owns_host, a.host_live, peers, a.owns_weights, a.weights_live
    )


class Violation(AssertionError):
    pass


def apply(w: World, i: int) -> tuple[World, tuple[int, ...]]:
    """Actor i takes its next step. Returns the new world and whom it waits for (actor indexes), if waiting."""
    a = w.actors[i]
    if a.link:
        return link_step(w, i), ()
    d = decide(view(w, i))
    if d.action == Act.WAIT:
        peers = peer_indexes(w, i)
        return w, tuple(peers[j] for j in d.waiting_for)
    pool = w.pools[a.rank]
    new = a
    if d.action == Act.ALLOCATE:
        if pool.live:
            raise Violation(f"owner of rank {a.rank} allocated a second pool while gen {pool.gen} is live (a leak)")
        version = w.cmd.aux if w.cmd.kind == Cmd.RESTORE else a.version
        pool = Pool(True, pool.gen + 1, version)
        new = adopt(replace(a, mapped=True, gen=pool.gen), version)
    elif d.action == Act.FREE:
        for j in peer_indexes(w, i):
            p = w.actors[j]
            if p.alive and p.mapped:
                raise Violation(f"owner freed the pool while {'link' if p.link else 'attacher'} {j} still maps it")
        pool = replace(pool, live=False)
        new = replace(a, mapped=False)
    elif d.action == Act.ATTACH:
        if not pool.live:
            raise Violation(f"attacher {i} attached to a freed pool")
        new = adopt(replace(a, mapped=True, gen=pool.gen), pool.version)
    elif d.action == Act.DETACH:
        new = replace(a, mapped=False)
    elif d.action == Act.RELEASE_HOST:
        new = replace(a, host_live=False)
    elif d.action == Act.RESTORE_HOST:
        new = replace(a, host_live=True)
    elif d.action == Act.RELEASE_WEIGHTS:
        new = replace(a, weights_live=False)
    elif d.action == Act.LOAD_WEIGHTS:
        new = replace(a, weights_live=True, weights_version=a.version)
    elif d.action == Act.FAIL:
        assert d.reason, "a failure must carry its reason"
        if not w.crashes:
            raise Violation(f"actor {i} failed although nothing crashed: {d.reason}")
        new = replace(a, mapped=False, status=Status(S.FAILED, a.status.epoch))  # runtime detaches in finally
    if d.publish is not None and d.action != Act.FAIL:
        assert d.publish != a.status or new != a, f"actor {i} took a step that changes nothing: {d}"
        new = replace(new, status=d.publish)
        check_version(w, i, new)
    return set_actor(w, i, new, pools=set_pool(w, a.rank, pool)), ()


def adopt(a: Actor, version: int) -> Actor:
    """The runtime's ``_adopt``: a worker that maps a pool of another version than its weights' holds no live
    weights for it (LOAD_WEIGHTS loads them next)."""
    if a.owns_weights:
        return replace(a, version=version, weights_live=a.weights_live and a.weights_version == version)
    return replace(a, version=version)


def check_version(w: World, i: int, a: Actor) -> None:
    """I7: an actor that acknowledges a RESTORE serves the restored weight version; one that resumes serves the
    version the controller's ledger holds (the last restore every actor acknowledged)."""
    if w.cmd.kind == Cmd.RESTORE and a.status.state == S.RESTORED and a.version != w.cmd.aux:
        raise Violation(f"actor {i} acknowledged RESTORE of version {w.cmd.aux} serving version {a.version}")
    if w.cmd.kind == Cmd.RESUME and a.status.state == S.READY and a.version != w.weight_version:
        raise Violation(f"actor {i} resumed serving version {a.version}; the last restore was {w.weight_version}")
    serving = (w.cmd.kind, a.status.state) in ((Cmd.RESTORE, S.RESTORED), (Cmd.RESUME, S.READY), (Cmd.NONE, S.READY))
    if a.owns_weights and serving and not (a.weights_live and a.weights_version == a.version):
        held = f"weights of version {a.weights_version}" if a.weights_live else "no weights"
        raise Violation(f"worker {i} acknowledged {w.cmd.kind.name} serving version {a.version} with {held}")


BOTH_TIERS = ClearFlags.DEVICE | ClearFlags.HOST
ALPHABET = (
    (Cmd.PAUSE, 0),
    (Cmd.RESUME, 0),
    (Cmd.CLEAR, int(ClearFlags.DEVICE)),
    (Cmd.CLEAR, int(ClearFlags.HOST)),
    (Cmd.CLEAR, int(BOTH_TIERS)),
    (Cmd.CLEAR, WEIGHTS),
    (Cmd.RESTORE, None),  # the version the pools hold now
    (Cmd.RESTORE, +1),  # a new one
    (Cmd.SHUTDOWN, 0),
)


def controller(w: World, free: int, max_timeouts: int) -> tuple[list[World], tuple[int, ...]]:
    """The controller's possible next steps and whom it waits for. It runs ``step_done``, ``settled_ledger`` and
    ``check_command`` as the real one does. With ``free`` > 0 it issues, up to ``free`` times, any command its API
    admits (then a shutdown); it may also give up on a step that is not done (up to ``max_timeouts`` times) and go
    on with any admitted command, as a trainer whose call timed out would. With ``free`` == 0 it follows SCRIPT."""
    bad = [i for i, a in enumerate(w.actors) if not a.link and (not a.alive or a.status.state == S.FAILED)]
    if bad:
        who = ", ".join(f"actor {i} ({'dead' if not w.actors[i].alive else 'FAILED'})" for i in bad)
        return [replace(w, end=f"error: {who} during {w.cmd.kind.name}@{w.cmd.epoch}")], ()
    statuses = [a.status for a in w.actors if not a.link]
    done = step_done(w.cmd, statuses)
    if done and w.cmd.kind == Cmd.SHUTDOWN:
        return [replace(w, end="done")], ()
    target = ACK_OF[w.cmd.kind]
    waiting = tuple(i for i, a in enumerate(w.actors) if not a.link and not a.status.at_least(target, w.cmd.epoch))
    gives_up = not done and w.timeouts < max_timeouts
    if not done and not gives_up:
        return [], waiting
    cleared, wv = settled_ledger(w.cmd, done, ClearFlags(w.cleared), w.weight_version)
    if done and w.cmd.kind == Cmd.RESTORE:
        stale = [i for i, a in enumerate(w.actors) if not a.link and a.version != w.cmd.aux]
        if stale:
            raise Violation(f"RESTORE of version {w.cmd.aux} acknowledged, but actors {stale} serve older versions")
    if not free:
        choices: tuple[tuple[Cmd, int | None], ...] = (SCRIPT[w.step + 1],)
    else:
        choices = ALPHABET if w.step < free else ((Cmd.SHUTDOWN, 0),)
    out = []
    for kind, arg in choices:
        aux = wv + (arg or 0) if kind == Cmd.RESTORE and free else int(arg or 0)
        refusal = check_command(kind, aux, w.cmd, cleared, wv, done)
        if refusal is not None:
            assert free or refusal.already is False, f"the script's {kind.name} was refused: {refusal.message}"
            continue
        new_cleared = cleared | ClearFlags(aux) if kind == Cmd.CLEAR else cleared
        out.append(
            replace(
                w,
                step=w.step + 1,
                cmd=Command(kind, w.cmd.epoch + 1, aux),
                cleared=int(new_cleared),
                weight_version=wv,
                timeouts=w.timeouts + (not done),
            )
        )
    assert out or not done, f"the controller has no admissible command in {w}"
    return out, waiting


def check_state(w: World) -> None:
    for i, a in enumerate(w.actors):
        pool = w.pools[a.rank]
        if a.alive and a.mapped and not (pool.live and a.gen == pool.gen):
            raise Violation(f"actor {i} maps pool gen {a.gen}, live={pool.live} gen={pool.gen}: stale view")


def successors(w: World, max_crashes: int, free: int, max_timeouts: int) -> tuple[list[World], dict[int, tuple]]:
    waits: dict[int, tuple[int, ...]] = {}
    out, ctl_waits = controller(w, free, max_timeouts)
    if ctl_waits:
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
            out.append(set_actor(w, i, replace(a, alive=False, mapped=False), crashes=w.crashes + 1))
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


def explore(
    n_attachers: int,
    owner_has_host: bool,
    max_crashes: int = 1,
    n_links: int = 0,
    opens: int = 2,
    tp: int = 1,
    free: int = 0,
    max_timeouts: int = 0,
) -> int:
    actors = []
    for rank in range(tp):
        per_rank = [Actor(Status(S.BOOTING, 0), rank=rank) for _ in range(n_attachers + 1)]
        host_holder = 0 if owner_has_host else 1
        per_rank[host_holder] = replace(per_rank[host_holder], owns_host=True)
        per_rank[1 - host_holder] = replace(per_rank[1 - host_holder], owns_weights=True)  # the worker
        actors += per_rank
    actors += [Actor(Status(S.STOPPED, 0), link=True, opens_left=opens) for _ in range(n_links)]
    start = World(-1, Command(Cmd.NONE, 0), tuple(actors), (Pool(),) * tp, per_rank=n_attachers + 1)
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
        nexts, waits = successors(w, max_crashes, free, max_timeouts)
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


@contextmanager
def replaced(**rules: object) -> Iterator[None]:
    """The checker runs with these rules (``decide``, ``check_command``, ``ANNOUNCE_FIRST``) in place of the real
    ones: the sanity tests break a rule on purpose and expect the checker to report it."""
    saved = {name: globals()[name] for name in rules}
    globals().update(rules)
    try:
        yield
    finally:
        globals().update(saved)


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

    with replaced(decide=reference), pytest.raises(Violation, match="wait-for cycle|deadlock"):
        explore(1, owner_has_host=False, max_crashes=0)


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

    with replaced(decide=hasty), pytest.raises(Violation, match="freed the pool while attacher 1 still maps it"):
        explore(1, owner_has_host=False, max_crashes=0)


# Two links with a crash anywhere (132k states, ~25 s) runs with the soak tests (-m slow): the suite's 10 minutes
@pytest.mark.parametrize(
    ("n_attachers", "n_links", "opens"), [(1, 1, 2), (2, 1, 2), pytest.param(1, 2, 1, marks=pytest.mark.slow)]
)
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
    caught = "freed the pool while link|mapped a freed pool|stale view"
    with replaced(ANNOUNCE_FIRST=False), pytest.raises(Violation, match=caught):
        explore(1, owner_has_host=False, max_crashes=0, n_links=1)


@pytest.mark.parametrize(
    ("tp", "n_attachers", "free", "max_crashes"),
    [
        (1, 1, 3, 0),
        (1, 2, 3, 0),
        (1, 3, 2, 0),
        (2, 1, 1, 0),  # two ranks (37k states, ~10 s); with two free commands (93k, ~28 s) under -m slow
        pytest.param(2, 1, 2, 0, marks=pytest.mark.slow),
        (1, 1, 3, 1),
    ],
)
def test_a_controller_that_gives_up_on_a_step(tp: int, n_attachers: int, free: int, max_crashes: int) -> None:
    """The controller may time out of any step at any moment and then issue any command its API admits (``free``
    commands, then a shutdown), as a trainer whose call timed out would: still no use after free and no stale view;
    no actor fails unless something crashed; and I7: once every actor acknowledged a RESTORE, every actor serves
    that weight version, and an actor resumes only with the version of the last acknowledged restore."""
    n = explore(n_attachers, owner_has_host=False, max_crashes=max_crashes, tp=tp, free=free, max_timeouts=1)
    print(
        f"[model] tp={tp}, owner + {n_attachers} attachers per rank, {free} commands of any kind, the controller "
        f"giving up on one step, {max_crashes} crash: {n} states explored, no violation"
    )
    assert n > 1000


def test_admitting_on_what_was_asked_is_caught() -> None:
    """Sanity check: the old admission rule (the next command checked against what the controller asked for, not
    what the actors acknowledged) lets a RESTORE run over a CLEAR that timed out. The checker must see it, through
    the actor that refuses to serve its old pool under the new version."""
    original = check_command

    def on_the_ledger_only(kind: Cmd, aux: int, last: Command, cleared: ClearFlags, wv: int, done: bool = True):  # type: ignore[no-untyped-def]
        return original(kind, aux, last, cleared, wv)

    caught = "failed although nothing crashed: RESTORE@.* still maps|with no weights"
    with replaced(check_command=on_the_ledger_only), pytest.raises(Violation, match=caught):
        explore(1, owner_has_host=False, max_crashes=0, free=3, max_timeouts=1)


def test_serving_the_old_pool_under_a_new_version_is_caught() -> None:
    """Sanity check of the I7 assertions: with the old admission rule and actors that keep a mapped pool at RESTORE
    whatever its version (the reproduced bug), an actor acknowledges the restore serving the old weights."""
    import dataclasses

    import mpkv.handshake as hs

    original_decide, original_check = hs.decide, check_command

    def keeps_its_pool(v: View) -> hs.Decision:
        return original_decide(dataclasses.replace(v, pool_version=v.cmd.aux if v.cmd.kind == Cmd.RESTORE else 0))

    def on_the_ledger_only(kind: Cmd, aux: int, last: Command, cleared: ClearFlags, wv: int, done: bool = True):  # type: ignore[no-untyped-def]
        return original_check(kind, aux, last, cleared, wv)

    with (
        replaced(decide=keeps_its_pool, check_command=on_the_ledger_only),
        pytest.raises(Violation, match="serving version|serve older versions"),
    ):
        explore(1, owner_has_host=False, max_crashes=0, free=3, max_timeouts=1)


def test_a_clear_counts_from_the_command_word_not_the_ledger() -> None:
    """A controller that died after writing CLEAR into the command word but before its ledger: what the admission
    rules see is still "cleared" (resume refused, no false "already cleared" over live pools); and a RESTORE counts
    only once every actor acknowledged it."""
    clear = Command(Cmd.CLEAR, 5, int(ClearFlags.DEVICE))
    cleared, wv = settled_ledger(clear, False, ClearFlags(0), 7)
    assert (cleared, wv) == (ClearFlags.DEVICE, 7)
    refusal = check_command(Cmd.RESUME, 0, clear, cleared, wv, done=True)
    assert refusal is not None and "cleared" in refusal.message and not refusal.already
    restore = Command(Cmd.RESTORE, 6, 8)
    assert settled_ledger(restore, False, ClearFlags.DEVICE, 7) == (ClearFlags.DEVICE, 7)
    assert settled_ledger(restore, True, ClearFlags.DEVICE, 7) == (ClearFlags(0), 8)


def test_a_wake_up_that_forgets_the_weights_is_caught() -> None:
    """Sanity check of the weights tier: a worker that acknowledges a RESTORE without loading the weights it cleared
    (the reported "gibberish after wake-up") must be reported."""
    import mpkv.handshake as hs

    original = hs.decide

    def forgets(v: View) -> hs.Decision:
        d = original(v)
        return hs.Decision(Act.ACK, hs.Status(ACK_OF[v.cmd.kind], v.cmd.epoch)) if d.action == Act.LOAD_WEIGHTS else d

    with replaced(decide=forgets), pytest.raises(Violation, match="with no weights"):
        explore(1, owner_has_host=False, max_crashes=0)


def test_an_owner_that_kept_its_pool_says_published_before_loading() -> None:
    """At a restore where the pool owner still maps its pool (a retry; a clear of other tiers), it publishes
    PUBLISHED@e first: its attachers wait for that, and must not wait out the load of its weights."""
    e = 7
    v = View(
        Status(S.PUBLISHED, e - 1),
        Command(Cmd.RESTORE, e, 2),
        True,
        True,
        2,
        False,
        False,
        (Status(S.DETACHED, e - 1),),
        owns_weights=True,
        weights_live=False,
    )
    assert decide(v) == Decision(Act.ACK, Status(S.PUBLISHED, e))
    after = replace(v, me=Status(S.PUBLISHED, e))
    assert decide(after).action == Act.LOAD_WEIGHTS


def test_a_restoring_attacher_allocates_its_host_pool_before_it_waits_for_the_owner() -> None:
    """Restore in parallel: the transfer manager's host pool does not wait for the owner's device pool, so a restore
    costs the larger allocation rather than the sum; its status stays as it was until it attached."""
    cleared = Status(S.CLEARED, 3)
    owner_busy = Status(S.CLEARED, 3)  # still allocating the device pool: not PUBLISHED@4 yet
    v = View(cleared, Command(Cmd.RESTORE, 4, 1), False, False, 0, True, False, (owner_busy,))
    assert decide(v) == Decision(Act.RESTORE_HOST, cleared)
    after = View(cleared, Command(Cmd.RESTORE, 4, 1), False, False, 0, True, True, (owner_busy,))
    assert decide(after) == Decision(Act.WAIT, waiting_for=(0,))
    dead_owner = View(cleared, Command(Cmd.RESTORE, 4, 1), False, False, 0, True, False, (None,))
    assert decide(dead_owner).action == Act.FAIL  # known dead (the runtime's liveness look): nothing allocated


def test_an_action_with_nothing_after_it_but_the_acknowledgement_publishes_that() -> None:
    """One publication per command where one is enough (each wakes whoever sleeps on the slot): an attacher's
    DETACH, an owner's FREE or ALLOCATE publish CLEARED or RESTORED themselves when nothing else is left to do;
    where something is (a host pool to release, weights to load), the intermediate state still shows first."""
    ready, clear, restore = Status(S.PAUSED, 3), Command(Cmd.CLEAR, 4, int(BOTH_TIERS)), Command(Cmd.RESTORE, 5, 0)
    messager = View(ready, clear, False, True, 0, False, False, (ready,))
    assert decide(messager) == Decision(Act.DETACH, Status(S.CLEARED, 4))
    transfer = View(ready, clear, False, True, 0, True, True, (ready,))
    assert decide(transfer) == Decision(Act.DETACH, Status(S.DETACHED, 4))  # its host pool goes next
    transfer = View(Status(S.DETACHED, 4), clear, False, False, 0, True, True, (ready,))
    assert decide(transfer) == Decision(Act.RELEASE_HOST, Status(S.CLEARED, 4))
    detached = Status(S.CLEARED, 4)
    owner = View(ready, clear, True, True, 0, False, False, (detached, detached), True, True)
    assert decide(owner) == Decision(Act.FREE, Status(S.CLEARED, 4))
    cleared = Status(S.CLEARED, 4)
    owner = View(cleared, restore, True, False, 0, True, True, (cleared, cleared))  # --pool-owner transfer
    assert decide(owner) == Decision(Act.ALLOCATE, Status(S.RESTORED, 5))
    messager = View(cleared, restore, False, False, 0, False, False, (Status(S.PUBLISHED, 5),))
    assert decide(messager) == Decision(Act.ATTACH, Status(S.RESTORED, 5))
    # A worker learns whether it holds the weights of the pool it maps only after adopting it (it compares
    # publications: a version may be published again after a restore that timed out), so it never skips ahead.
    for live in (True, False):
        owner = View(cleared, restore, True, False, 0, False, False, (cleared, cleared), True, live)
        assert decide(owner) == Decision(Act.ALLOCATE, Status(S.PUBLISHED, 5))
        worker = View(cleared, restore, False, False, 0, False, False, (Status(S.PUBLISHED, 5),), True, live)
        assert decide(worker) == Decision(Act.ATTACH, Status(S.PUBLISHED, 5))
