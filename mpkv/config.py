"""Cache geometry and instance configuration: one frozen dataclass, validated once, shared by every actor."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

from mpkv.blocks import TOKEN_ID_LIMIT
from mpkv.protocol import MAX_WEIGHT_VERSION, PdRole, PoolOwner

if TYPE_CHECKING:
    import torch

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}  # torch is imported only where tensors are made


@dataclass(frozen=True)
class CacheConfig:
    """KV geometry per instance. Per rank, the pool holds ``kv_heads // tp`` heads of every layer.

    Device pool layout per rank (one allocation; per-layer K/V are views):
    ``[layers, 2 (K, V), device_blocks, block_size, kv_heads // tp, head_dim]``; the host pool is the same with
    ``host_blocks``. A "block" is ``block_size`` tokens of every layer's K and V.
    """

    layers: int = 4
    kv_heads: int = 4
    head_dim: int = 32
    block_size: int = 16
    dtype: str = "float16"
    device_blocks: int = 256
    host_blocks: int = 256
    tp: int = 1
    backend: str = "cpu"
    pool_owner: PoolOwner = PoolOwner.WORKER
    pd_role: PdRole = PdRole.MIXED  # `mpkv launch --role mixed|prefill|decode`
    nixl_port: int = 0  # PD across hosts: rank r's messager runs a NIXL agent listening on nixl_port + r (0: off)
    log_dir: str = ""  # set by the launcher: every actor logs to <log_dir>/<role>.r<rank>.log
    hidden: int = 64  # the synthetic model's width
    vocab: int = 1024
    weight_version: int = 1  # the weights the instance starts with

    def __post_init__(self) -> None:
        for f in (
            "layers",
            "kv_heads",
            "head_dim",
            "block_size",
            "device_blocks",
            "host_blocks",
            "tp",
            "hidden",
            "vocab",
        ):
            v = getattr(self, f)
            if not _is_int(v) or v <= 0:
                raise ValueError(f"config: {f} must be a positive integer, got {v!r}")
        if self.vocab > TOKEN_ID_LIMIT:
            raise ValueError(f"config: vocab must be at most {TOKEN_ID_LIMIT} (token ids are int32), got {self.vocab}")
        wv = self.weight_version
        if not _is_int(wv) or not 0 <= wv <= MAX_WEIGHT_VERSION:
            raise ValueError(f"config: weight_version must be an integer in 0..{MAX_WEIGHT_VERSION}, got {wv!r}")
        if not _is_int(self.nixl_port):
            raise ValueError(f"config: nixl_port must be an integer, got {self.nixl_port!r}")
        if not isinstance(self.log_dir, str):
            raise ValueError(f"config: log_dir must be a path, got {self.log_dir!r}")
        if self.nixl_port and not 1024 <= self.nixl_port <= 65535 - self.tp:
            raise ValueError(f"config: nixl_port must be 0 (off) or a port in 1024..{65535 - self.tp}")
        if self.kv_heads % self.tp:
            raise ValueError(f"config: kv_heads ({self.kv_heads}) must be divisible by tp ({self.tp})")
        if not isinstance(self.dtype, str) or self.dtype not in DTYPE_BYTES:
            raise ValueError(f"config: dtype {self.dtype!r} is not one of {sorted(DTYPE_BYTES)}")
        if self.backend not in ("cpu", "cuda"):
            raise ValueError(f"config: backend must be 'cpu' or 'cuda', got {self.backend!r}")
        if not isinstance(self.pool_owner, PoolOwner):
            object.__setattr__(self, "pool_owner", _named(PoolOwner, self.pool_owner, "pool_owner"))
        if not isinstance(self.pd_role, PdRole):
            object.__setattr__(self, "pd_role", _named(PdRole, self.pd_role, "role"))

    @property
    def heads_per_rank(self) -> int:
        return self.kv_heads // self.tp

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        dtype: torch.dtype = getattr(torch, self.dtype)
        return dtype

    @property
    def itemsize(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def block_elems(self) -> int:
        """Elements of one block of one layer's K (or V) on one rank."""
        return self.block_size * self.heads_per_rank * self.head_dim

    @property
    def block_bytes(self) -> int:
        """Bytes of one block across all layers, K and V, on one rank: what a swap of one block moves."""
        return self.layers * 2 * self.block_elems * self.itemsize

    def pool_shape(self, blocks: int) -> tuple[int, ...]:
        return (self.layers, 2, blocks, self.block_size, self.heads_per_rank, self.head_dim)

    def pool_bytes(self, blocks: int) -> int:
        return blocks * self.block_bytes

    def to_json(self) -> str:
        d = asdict(self)
        d["pool_owner"] = self.pool_owner.name.lower()
        d["pd_role"] = self.pd_role.name.lower()
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CacheConfig:
        d = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"config: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # True is an int to Python, never a size here


def _named(enum_type: type[PoolOwner] | type[PdRole], value: object, what: str) -> PoolOwner | PdRole:
    try:
        return enum_type[str(value).upper()]
    except KeyError:
        names = ", ".join(m.name.lower() for m in enum_type)
        raise ValueError(f"config: {what} must be one of {names}, got {value!r}") from None
