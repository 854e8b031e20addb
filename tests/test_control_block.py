"""One RL cycle driven through the documented command block (docs/control-block.md) with the standard library
only: no mpkv import in the driver. The driver runs in a clean subprocess so nothing of mpkv is loaded there."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from instances import Launched

from mpkv.controller import Controller

DRIVER = textwrap.dedent(
    r"""
    import ctypes, json, mmap, os, platform, struct, sys, time

    name = sys.argv[1]
    uid = os.getuid()

    def open_seg(path):
        fd = os.open(path, os.O_RDWR)
        try:
            return mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)

    reg = open_seg(f"/dev/shm/mpkv.u{uid}.{name}.registry")
    assert reg[0:8] == b"MPKVSEG\0" and struct.unpack_from("<I", reg, 8)[0] == 2
    run = reg[256:272].rstrip(b"\0").decode()
    base = f"/dev/shm/mpkv.u{uid}.{name}.{run}."
    control, status, errors = open_seg(base + "control"), open_seg(base + "status"), open_seg(base + "errors")
    config = open_seg(base + "config")
    n = struct.unpack_from("<I", config, 256)[0]
    tp = json.loads(config[260:260 + n])["tp"]

    libc = ctypes.CDLL(None, use_errno=True)
    SYS_futex = {"x86_64": 202, "aarch64": 98}[platform.machine()]
    base_addr = ctypes.addressof(ctypes.c_char.from_buffer(control))  # where the mapping starts

    def slot(i):
        return 320 + 64 * i

    def read(m, i):
        while True:
            s1 = struct.unpack_from("<Q", m, slot(i))[0]
            if s1 & 1:
                continue
            fields = struct.unpack_from("<qQQQQQ", m, slot(i) + 8)
            if struct.unpack_from("<Q", m, slot(i))[0] == s1:
                return fields  # value, epoch, pid, start, timestamp, aux

    def write(i, value, epoch, aux):
        off = slot(i)
        seq = struct.unpack_from("<Q", control, off)[0]
        struct.pack_into("<Q", control, off, seq + 1)
        me = (os.getpid(), start_ticks(), time.monotonic_ns())
        struct.pack_into("<qQQQQQ", control, off + 8, value, epoch, *me, aux)
        struct.pack_into("<Q", control, off, seq + 2)
        libc.syscall(SYS_futex, ctypes.c_void_p(base_addr + off), 1, 2**31 - 1, None, None, 0)  # FUTEX_WAKE

    def start_ticks():
        raw = open(f"/proc/{os.getpid()}/stat").read()
        return int(raw[raw.rindex(")") + 2:].split()[19])

    def step(value, aux, ack):
        epoch = read(control, 0)[1] + 1
        write(0, value, epoch, aux)
        deadline = time.monotonic() + 60
        for i in range(3 * tp):
            while True:
                v, e, pid, _, _, a = read(status, i)
                if v == 99:
                    n = struct.unpack_from("<I", errors, 256 + 4096 * i)[0]
                    sys.exit("actor failed: " + errors[260 + 4096 * i:260 + 4096 * i + n].decode())
                if e > epoch or (e == epoch and v >= ack):
                    break
                if time.monotonic() > deadline:
                    sys.exit(f"status slot {i} (pid {pid}) did not acknowledge {value}@{epoch}: {v}@{e}")
                time.sleep(0.001)  # pacing of this simple external driver's poll; the deadline bounds it
        return epoch

    for i in (0, 1):                                   # claim both control slots (no live holder here)
        assert struct.unpack_from("<Q", control, slot(i) + 56)[0] == 0
        struct.pack_into("<Q", control, slot(i) + 56, os.getpid())
    step(1, 0, 21)                                     # PAUSE -> PAUSED
    e = step(3, 3, 31)                                 # CLEAR device+host -> CLEARED
    released = sum(read(status, i)[5] for i in range(3 * tp))
    write(1, 3, e, (1 << 3) | 3)                       # ledger: cleared both, weight version 1
    e = step(4, 7, 41)                                 # RESTORE weight version 7 -> RESTORED
    write(1, 4, e, 7 << 3)                             # ledger: nothing cleared, weight version 7
    step(2, 0, 45)                                     # RESUME -> READY
    print(json.dumps({"released": released, "epoch": read(control, 0)[1]}))
    """
)


def test_one_cycle_through_the_documented_block(instance: str) -> None:
    with Launched(instance, tp=2):
        out = subprocess.run([sys.executable, "-c", DRIVER, instance], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "mpkv" not in out.stderr
        result = __import__("json").loads(out.stdout)
        assert result["epoch"] == 4 and result["released"] > 0
        with Controller(instance) as ctl:  # the driver is gone, so the controller may take the block over
            st = ctl.status()
            assert st.weight_version == 7 and st.command.kind == "RESUME"
            assert {(a.state, a.epoch, a.aux) for a in st.actors} == {("READY", 4, 7)}
            ctl.shutdown()
