"""I8: another local user must not read, write, stop or confuse an instance. The other user is a child that drops
to uid 65534 (tests/hostile.py); what it creates is removed here, as root, so the leak check stays meaningful."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator

import hostile
import numpy as np
import procs
import pytest
from helpers import Child
from instances import Launched, prefill_and_verify

from mpkv import naming
from mpkv.client import Client
from mpkv.controller import Controller
from mpkv.errors import AttachError, MpkvError, NameTaken
from mpkv.instance import CONFIG_BYTES
from mpkv.layout import SegmentKind
from mpkv.shm.cleanup import cleanup
from mpkv.shm.registry import Registry
from mpkv.shm.segment import Segment

needs_root = pytest.mark.skipif(os.getuid() != 0, reason="acting as another user needs root (setuid to 65534)")


def _present(names: list[str]) -> list[str]:
    return [n for n in names if os.path.exists(naming.shm_path(n))]


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@needs_root
def test_a_planted_registry_cannot_make_cleanup_unlink_a_live_instance(instance: str) -> None:
    """Point 12: uid 65534 plants a registry under our name prefix listing a live instance's names, claimed by a
    dead pid. Cleanup must not judge it at all (not our file), and must leave the live instance whole."""
    owner = Child(procs.instance_owner, instance)
    victims = sorted(owner.recv(30).values())
    evil = naming.registry_name(f"{instance}evil")
    planted = Child(hostile.plant_registry, naming.shm_path(evil), "deadbeef", victims)
    try:
        assert planted.result(30) == hostile.NOBODY
        assert os.stat(naming.shm_path(evil)).st_uid == hostile.NOBODY
        for dry_run in (True, False):
            report = cleanup(dry_run=dry_run)
            assert not [n for n in report.removed if instance in n], f"judged stale: {report.removed}"
            assert (evil, f"belongs to uid {hostile.NOBODY}, not to us (uid 0)") in report.untrusted
            assert f"left alone {evil}: it belongs to uid {hostile.NOBODY}" in "\n".join(report.lines(dry_run))
        assert _present(victims) == victims, "cleanup unlinked names of a live instance"
        assert _present([evil]) == [evil], "cleanup removed another user's file"
    finally:
        _remove(naming.shm_path(evil))
        owner.conn.send("stop")
        owner.join(30)


def test_a_registry_vouches_only_for_its_own_instance_and_run(instance: str) -> None:
    """Point 12, second half: a registry of ours (dead owner) that lists another instance's names, or names of
    another run, gets those entries refused: cleanup removes only what starts with its instance and run id."""
    owner = Child(procs.instance_owner, instance)
    victims = sorted(owner.recv(30).values())
    dead = f"{instance}dead"
    reg = naming.registry_name(dead)
    own = naming.object_name(dead, "deadbeef", "ring.a")
    other_run = naming.object_name(dead, "0badc0de", "ring.a")
    hostile.forge_registry(naming.shm_path(reg), "deadbeef", [*victims, own, other_run])
    try:
        report = cleanup(instance=None, dry_run=True)
        assert reg in report.removed and not [n for n in report.removed if instance in n and n != reg]
        refused = {entry for entry, r, _ in report.refused if r == reg}
        assert refused == {*victims, other_run}
        report = cleanup(instance=dead)
        assert report.removed == [reg], report.lines(False)
        assert "a registry lists only its own instance's names" in "\n".join(report.lines(False))
        assert _present(victims) == victims, "cleanup unlinked names another registry listed"
    finally:
        _remove(naming.shm_path(reg))
        owner.conn.send("stop")
        owner.join(30)


def _squat_next_pools(instance: str, run_id: str, epochs: range) -> list[str]:
    """Every pool name the old scheme would have used for these epochs: all the other user can derive."""
    return [
        naming.shm_path(naming.object_name(instance, run_id, f"pool.{tier}.r0.e{e}"))
        for tier in ("dev", "host")
        for e in epochs
    ]


@needs_root
def test_squatted_pool_names_do_not_fail_a_restore(instance: str, rng) -> None:
    """Point 14: the run id shows in /dev/shm, so uid 65534 creates every pool name of the next epochs that it
    can derive from it. The RL cycle (pause, clear, restore, resume) must still succeed, and serve verified KV."""
    gen = np.random.default_rng(rng.randrange(2**32))
    squatted: list[str] = []
    try:
        with Launched(instance, tp=1), Controller(instance) as ctl, Client(instance) as client:
            run_id = ctl.inst.registry.run_id
            squatted = _squat_next_pools(instance, run_id, range(1, 40))
            assert Child(hostile.squat, squatted).result(30) == len(squatted)
            for wv in (ctl.weight_version + 1, ctl.weight_version + 2):
                ctl.pause()
                ctl.clear()
                ctl.restore(wv)
                ctl.resume()
                blocks = gen.permutation(client.cfg.device_blocks)[:3].astype(np.int32)
                prefill_and_verify(client, gen, blocks, wv)
            assert {a.state for a in ctl.status().actors} == {"READY"}
            ctl.shutdown()
    finally:
        for path in squatted:
            _remove(path)


def test_a_taken_pool_name_is_skipped_for_a_fresh_one(instance: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The retry behind point 14: a random name that is taken anyway is skipped (its registry entry given back);
    when every try is taken, a named NameTaken, and nothing was created."""
    reg = Registry.create(instance)
    taken = naming.shm_path(reg.name_of("pool.dev.r0.e1.taken"))
    os.close(os.open(taken, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    try:
        picks = iter(["pool.dev.r0.e1.taken", "pool.dev.r0.e1.taken", "pool.dev.r0.e1.fresh"])
        monkeypatch.setattr(naming, "unique", lambda obj: next(picks))
        seg = reg.create_unique_segment("pool.dev.r0.e1", SegmentKind.POOL, 4096)
        assert seg.name == reg.name_of("pool.dev.r0.e1.fresh")
        assert [e.name for e in reg.entries()] == [seg.name], "a taken name's claim was not given back"
        reg.release(seg)
        monkeypatch.setattr(naming, "unique", lambda obj: "pool.dev.r0.e1.taken")
        with pytest.raises(NameTaken, match="4 fresh random names for pool.dev.r0.e1 were all taken"):
            reg.create_unique_segment("pool.dev.r0.e1", SegmentKind.POOL, 4096)
        assert reg.entries() == []
    finally:
        os.unlink(taken)
        reg.destroy()


@pytest.fixture
def tmp_root(instance: str) -> Iterator[str]:
    """A sticky, world-writable directory like /tmp, for this test alone (the real /tmp's mpkv-logs.u0 is other
    runs' business): the launcher's temporary directory (TMPDIR) in the log tests."""
    base = os.path.join("/tmp", f"mpkv-test-{instance}")
    os.mkdir(base)
    os.chmod(base, 0o1777)
    try:
        yield base
    finally:
        shutil.rmtree(base)


def _victim(base: str) -> tuple[str, bytes]:
    path = os.path.join(base, "victim")
    content = b"a file of root's that no log line may reach\n"
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.write(fd, content)
    os.close(fd)
    return path, content


def _hijack_logs(root: str, instance: str, victim: str) -> None:
    links = {f"{role}.r0.log": victim for role in ("worker", "transfer", "messager")}
    Child(hostile.hijack_dir, root, instance, links).result(30)


@needs_root
def test_a_hijacked_log_root_is_not_used(instance: str, tmp_root: str) -> None:
    """Point 13: uid 65534 made the default log root first (0777) with <instance>/worker.r0.log -> a victim file.
    The launcher must not log there: it says so and logs to a fresh private directory; the victim is untouched."""
    victim, content = _victim(tmp_root)
    hijacked = os.path.join(tmp_root, "mpkv-logs.u0")
    _hijack_logs(hijacked, instance, victim)
    with Launched(instance, tp=1, env={"TMPDIR": tmp_root}) as launched, Controller(instance) as ctl:
        log_dir = ctl.status().config["log_dir"]
        ctl.shutdown()
    with open(victim, "rb") as f:
        assert f.read() == content, "the actors wrote log lines through the planted link"
    said = "".join(launched.lines)
    assert f"log directory {hijacked} belongs to uid {hostile.NOBODY}" in said, said
    assert "logging to a fresh private" in said
    assert not log_dir.startswith(hijacked + "/")
    for d in (log_dir, os.path.dirname(log_dir)):
        st = os.lstat(d)
        assert stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o700, d
    log = os.path.join(log_dir, "worker.r0.log")
    assert stat.S_IMODE(os.stat(log).st_mode) == 0o600 and os.path.getsize(log) > 0


@needs_root
def test_a_hijacked_named_log_dir_is_refused(instance: str, tmp_root: str) -> None:
    """Point 13, MPKV_LOG_DIR: a log root the user named but another user owns is refused, by name, before
    anything is created; the victim is untouched."""
    victim, content = _victim(tmp_root)
    named = os.path.join(tmp_root, "logs")
    _hijack_logs(named, instance, victim)
    args = [sys.executable, "-m", "mpkv.cli", "launch", "--name", instance, "--tp", "1"]
    env = dict(os.environ, MPKV_LOG_DIR=named, TMPDIR=tmp_root)
    with open(os.path.join(tmp_root, "stderr"), "w+") as err:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        assert proc.stdout is not None
        try:
            first = proc.stdout.readline()  # "... ready" had it launched (and logged), "" once it refused and exited
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            code = proc.wait(60)
            proc.stdout.close()
        err.seek(0)
        said = err.read()
    with open(victim, "rb") as f:
        assert f.read() == content, "the actors wrote log lines through the planted link"
    assert (code, first) == (1, ""), said
    assert f"log directory {named} belongs to uid {hostile.NOBODY}, not to us (uid 0): refusing" in said


def test_log_files_are_never_opened_through_a_link(tmp_path: pathlib.Path) -> None:
    """Point 13, the last line of defence: the actor's log opener refuses a link even in a directory of ours."""
    from mpkv.actors.entry import private_log_opener

    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    (tmp_path / "worker.r0.log").symlink_to(victim)
    with pytest.raises(MpkvError, match=r"worker.r0.log cannot be opened: it is a symbolic link"):
        private_log_opener(str(tmp_path / "worker.r0.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    fd = private_log_opener(str(tmp_path / "new.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.close(fd)
    assert stat.S_IMODE(os.stat(tmp_path / "new.log").st_mode) == 0o600
    assert victim.read_bytes() == b"untouched"


def _ctl_says(instance: str, action: str) -> str:
    """Run `mpkv ctl NAME ACTION`: it must fail with one clear line, never a traceback."""
    cmd = [sys.executable, "-m", "mpkv.cli", "ctl", instance, action, "--timeout", "5"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1 and done.stderr.startswith("mpkv: "), done
    return done.stderr


def test_a_link_at_the_registry_name_is_a_clear_error(instance: str, tmp_path: pathlib.Path) -> None:
    """Point 11: a symbolic link at an instance's registry name (anyone can make one in /dev/shm): ctl status and
    pause end in a sentence, cleanup leaves the link and its target alone."""
    target = tmp_path / "target"
    target.write_bytes(b"x" * 4096)
    link = naming.shm_path(naming.registry_name(instance))
    os.symlink(target, link)
    try:
        for action in ("status", "pause"):
            assert "is a symbolic link" in _ctl_says(instance, action)
        with pytest.raises(AttachError, match=f"instance '{instance}' cannot be attached .*symbolic link"):
            Registry.attach(instance)
        report = cleanup(instance=instance)
        assert report.removed == [] and [n for n, _ in report.untrusted] == [naming.registry_name(instance)]
        assert os.path.islink(link) and target.read_bytes() == b"x" * 4096
    finally:
        os.unlink(link)


def test_a_registry_with_a_garbage_payload_is_a_clear_error(instance: str, rng) -> None:
    """Point 11: a registry whose header is intact but whose payload (run id, entries) is garbage, and a registry
    that is fine but whose config record is garbage: ctl status and pause say so; nothing is left mapped."""
    garbage = bytes(rng.randrange(128, 256) for _ in range(4096))  # no valid UTF-8 run id can come out of it
    seg = Segment.create(naming.registry_name(instance), SegmentKind.REGISTRY, len(garbage))
    seg.payload[:] = garbage
    seg.mark_ready()
    try:
        for action in ("status", "pause"):
            assert f"registry {seg.name} of instance '{instance}' is corrupt" in _ctl_says(instance, action)
    finally:
        seg.close()
        seg.unlink()
    reg = Registry.create(instance)
    config = reg.create_segment("config", SegmentKind.BLOB, CONFIG_BYTES)
    config.payload[:4] = (200).to_bytes(4, "little")
    config.payload[4:204] = garbage[:200]
    config.mark_ready()
    try:
        for action in ("status", "pause"):
            assert f"its config {config.name} is not a config mpkv wrote" in _ctl_says(instance, action)
    finally:
        reg.release(config)
        reg.destroy()
