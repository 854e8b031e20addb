"""Launch a real instance (`mpkv launch` in a child process) for a test, and always tear it down."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

import numpy as np
import torch

from mpkv.client import Client
from mpkv.config import CacheConfig
from mpkv.model import expected_kv

SMALL = dict(layers=2, kv_heads=4, head_dim=16, block_size=8, device_blocks=64, host_blocks=64)


class Launched:
    def __init__(
        self,
        name: str,
        tp: int = 2,
        owner: str = "worker",
        fault: str | None = None,
        role: str = "mixed",
        env: dict[str, str] | None = None,
        **geometry: int,
    ) -> None:
        args = [sys.executable, "-m", "mpkv.cli", "launch", "--name", name, "--tp", str(tp), "--pool-owner", owner]
        args += ["--role", role]
        settings: dict[str, int | str] = {**SMALL, **geometry}
        for k, v in settings.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        env = dict(os.environ) | (env or {})
        if fault:
            env["MPKV_FAULT"] = fault
        self.name = name
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []

    def wait_line(self, needle: str, timeout_s: float = 120) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    break
                self.lines.append(line)
                if needle in line:
                    return line
        raise AssertionError(f"launcher never printed {needle!r}; printed {self.lines}, exit {self.proc.poll()}")

    def __enter__(self) -> Launched:
        self.wait_line("ready")
        return self

    def exit_code(self, timeout_s: float = 60) -> int:
        try:
            code = self.proc.wait(timeout_s)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
        assert self.proc.stdout is not None
        self.lines += self.proc.stdout.readlines()
        return code

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.exit_code()
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


def verify(client: Client, tokens: np.ndarray, blocks: np.ndarray, wv: int, host: bool = False) -> int:
    """Read ``blocks`` back from every rank and compare with the synthetic model's KV, byte for byte."""
    cfg: CacheConfig = client.cfg
    dones = client.wait(client.read_blocks(blocks, host=host))
    for d in dones:
        assert d.weight_version == wv, f"rank {d.rank} serves weight version {d.weight_version}, expected {wv}"
        got = torch.frombuffer(bytearray(d.data), dtype=cfg.torch_dtype)
        got = got.view(cfg.layers, 2, len(blocks) * cfg.block_size, cfg.heads_per_rank, cfg.head_dim)[
            :, :, : len(tokens)
        ]
        want = expected_kv(cfg, d.rank, wv, tokens)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (
            f"rank {d.rank}: KV differs from weight version {wv}"
        )
    return len(dones)


def prefill_and_verify(client: Client, rng: np.random.Generator, blocks: np.ndarray, wv: int) -> np.ndarray:
    n_tokens = int(rng.integers(1, len(blocks) * client.cfg.block_size + 1))
    n_tokens = max(n_tokens, (len(blocks) - 1) * client.cfg.block_size + 1)
    tokens = rng.integers(0, client.cfg.vocab, n_tokens, dtype=np.int32)
    client.wait(client.prefill("req", tokens, blocks))
    verify(client, tokens, blocks, wv)
    return tokens
