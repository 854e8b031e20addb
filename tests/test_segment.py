"""Segments and names: every bad attach gets a clear error and changes nothing on disk."""

from __future__ import annotations

import hashlib
import os

import pytest

from mpkv import _native, layout, naming
from mpkv.errors import AttachError, NameTaken
from mpkv.layout import SegmentKind
from mpkv.shm.registry import Registry
from mpkv.shm.segment import Segment


def _digest(name: str) -> str:
    with open(naming.shm_path(name), "rb") as f:
        st = os.fstat(f.fileno())
        return f"{st.st_uid}:{st.st_mode:o}:" + hashlib.sha256(f.read()).hexdigest()


@pytest.fixture
def seg(instance: str):
    reg = Registry.create(instance)
    s = reg.create_segment("test.seg", SegmentKind.TEST, 4096)
    s.payload[:5] = b"hello"
    s.mark_ready()
    yield s
    reg.release(s)
    reg.destroy()


def test_created_exclusive_private_with_owner_header(seg: Segment) -> None:
    st = os.stat(naming.shm_path(seg.name))
    assert st.st_mode & 0o777 == 0o600
    other = Segment.attach(seg.name, SegmentKind.TEST, 4096)
    try:
        assert bytes(other.payload[:5]) == b"hello"
        assert other.owner.pid == os.getpid() and other.owner.alive()
        assert other.owner_uid == os.getuid()
    finally:
        other.close()
    with pytest.raises(NameTaken, match="its owner pid \\d+ \\(alive.*is the instance already running"):
        Segment.create(seg.name, SegmentKind.TEST, 4096)


def test_attach_missing_name(instance: str) -> None:
    with pytest.raises(AttachError, match="no segment /mpkv.*: the instance is not running"):
        Segment.attach(f"/mpkv.u{os.getuid()}.{instance}.deadbeef.nothing", SegmentKind.TEST)
    with pytest.raises(AttachError, match=f"instance '{instance}' is not running here"):
        Registry.attach(instance)


def _expect_refusal(seg: Segment, match: str, kind: SegmentKind = SegmentKind.TEST, size: int | None = 4096) -> None:
    before = _digest(seg.name)
    with pytest.raises(AttachError, match=match):
        Segment.attach(seg.name, kind, size)
    assert _digest(seg.name) == before, "a refused attach changed the segment"


def test_attach_wrong_size_kind_version(seg: Segment) -> None:
    _expect_refusal(seg, "holds 4096 payload bytes, expected 8192", size=8192)
    _expect_refusal(seg, "is a TEST segment, expected RING", kind=SegmentKind.RING)
    seg.buf[8:12] = (layout.LAYOUT_VERSION + 1).to_bytes(4, "little")
    _expect_refusal(seg, f"layout version {layout.LAYOUT_VERSION + 1}, this mpkv speaks {layout.LAYOUT_VERSION}")
    seg.buf[8:12] = layout.LAYOUT_VERSION.to_bytes(4, "little")


def test_attach_refuses_another_users_segment(seg: Segment) -> None:
    # Simulated in the header (works for any user) ...
    seg.buf[28:32] = (os.getuid() + 1).to_bytes(4, "little")
    _expect_refusal(seg, f"was created by uid {os.getuid() + 1}, not by us")
    seg.buf[28:32] = os.getuid().to_bytes(4, "little")
    # ... and for real on the file, where we may chown (root in CI).
    if os.getuid() == 0:
        os.chown(naming.shm_path(seg.name), 65534, -1)
        try:
            _expect_refusal(seg, "belongs to uid 65534, not to us")
        finally:
            os.chown(naming.shm_path(seg.name), 0, -1)


def test_attach_refuses_a_world_readable_segment(seg: Segment) -> None:
    os.chmod(naming.shm_path(seg.name), 0o644)
    _expect_refusal(seg, "has mode 0644; mpkv creates 0600")
    os.chmod(naming.shm_path(seg.name), 0o600)


def test_attach_refuses_a_segment_not_ready(instance: str) -> None:
    reg = Registry.create(instance)
    try:
        s = reg.create_segment("half", SegmentKind.TEST, 64)  # creator "still initializing": no mark_ready
        with pytest.raises(AttachError, match="is not ready: its creator pid \\d+ .* has not finished"):
            Segment.attach(s.name, SegmentKind.TEST)
        reg.release(s)
    finally:
        reg.destroy()


def test_foreign_file_squatting_a_name(instance: str) -> None:
    name = f"/mpkv.u{os.getuid()}.{instance}.registry"
    path = naming.shm_path(name)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.write(fd, b"I am not an mpkv segment" * 20)
    os.close(fd)
    try:
        before = _digest(name)
        with pytest.raises(NameTaken, match="taken by a file that is not an mpkv segment"):
            Registry.create(instance)
        with pytest.raises(AttachError, match="not an mpkv segment \\(bad magic"):
            Registry.attach(instance)
        assert _digest(name) == before
    finally:
        os.unlink(path)


def test_names_are_validated() -> None:
    with pytest.raises(naming.BadName, match="instance name 'bad/name' is not valid"):
        naming.registry_name("bad/name")
    with pytest.raises(naming.BadName, match="object name"):
        naming.object_name("ok", "0123abcd", "../escape")


def test_native_rejects_out_of_range_words(seg: Segment) -> None:
    with pytest.raises(ValueError, match="out of range or not 8-byte aligned"):
        _native.load_u64(seg.buf, seg.total_bytes)
    with pytest.raises(ValueError, match="not 8-byte aligned"):
        _native.store_u64(seg.buf, 3, 1)
