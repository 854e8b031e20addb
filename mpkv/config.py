"""Cache geometry and instance configuration: one frozen dataclass, validated once, shared by every actor."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args, get_origin, get_type_hints

import msgspec
from msgspec import Meta

from mpkv.blocks import TOKEN_ID_LIMIT
from mpkv.protocol import MAX_WEIGHT_VERSION, PdRole, PoolOwner

if TYPE_CHECKING:
    import torch

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}  # torch is imported only where tensors are made

MAX_MODEL_CHARS = 1024  # a model's path travels in the config record (CONFIG_BYTES in all)
MODEL_FIELDS = {  # the CacheConfig fields a checkpoint's config.json fixes, and the key that fixes each
    "layers": "num_hidden_layers",
    "kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "vocab": "vocab_size",
    "hidden": "hidden_size",
}

# The range of each field, declared once on the field itself: msgspec checks it (CacheConfig.__post_init__), the
# CLI checks each flag against it, and every error message states it (valid_range).
Positive = Annotated[int, Meta(ge=1)]
Port = Annotated[int, Meta(ge=0, le=65535)]


@dataclass(frozen=True)
class CacheConfig:
    """KV geometry per instance. Per rank, the pool holds ``kv_heads // tp`` heads of every layer.

    Device pool layout per rank (one allocation; per-layer K/V are views):
    ``[layers, 2 (K, V), device_blocks, block_size, kv_heads // tp, head_dim]``; the host pool is the same with
    ``host_blocks``. A "block" is ``block_size`` tokens of every layer's K and V.
    """

    layers: Positive = 4
    kv_heads: Positive = 4
    head_dim: Positive = 32
    block_size: Positive = 16
    dtype: str = "float16"
    device_blocks: Positive = 256
    host_blocks: Positive = 256
    tp: Positive = 1
    backend: str = "cpu"
    # cuda: the device pool at one virtual address for the life of each process (CUDA virtual memory, cuda/), so a
    # captured CUDA graph stays valid across clear and restore (`mpkv launch --stable-addresses`)
    stable_addresses: bool = False
    pool_owner: PoolOwner = PoolOwner.WORKER
    pd_role: PdRole = PdRole.MIXED  # `mpkv launch --role mixed|prefill|decode`
    nixl_port: Port = 0  # PD across hosts: rank r's messager runs a NIXL agent listening on nixl_port + r (0: off)
    log_dir: str = ""  # set by the launcher: every actor logs to <log_dir>/<role>.r<rank>.log
    hidden: Positive = 64  # the synthetic model's width
    vocab: Annotated[int, Meta(ge=1, le=TOKEN_ID_LIMIT)] = 1024  # token ids are int32
    weight_version: Annotated[int, Meta(ge=0, le=MAX_WEIGHT_VERSION)] = 1  # the weights the instance starts with
    # The model plug-in (mpkv.model): "synthetic", a Hugging Face checkpoint directory (absolute once resolved by
    # ``resolve_model``), or "module:Class".
    model: Annotated[str, Meta(min_length=1, max_length=MAX_MODEL_CHARS)] = "synthetic"

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        try:
            check_fields(values)
        except ValueError as e:
            raise ValueError(f"config: {e}") from None
        for f, enum_type in (("pool_owner", PoolOwner), ("pd_role", PdRole)):
            if isinstance(values[f], str):  # checked above: the lower-case name of a member
                object.__setattr__(self, f, enum_type[values[f].upper()])

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
    def from_json(cls, text: str | bytes) -> CacheConfig:
        """A config from a JSON object of its fields; an unknown field, a value of the wrong type or out of its
        range is a ValueError naming the field (and its range)."""
        try:
            values = msgspec.json.decode(text)
        except msgspec.DecodeError as e:
            raise ValueError(f"config: not JSON ({e})") from None
        if not isinstance(values, dict):
            raise ValueError(f"config: expected a JSON object of CacheConfig fields, got {type(values).__name__}")
        return cls.from_fields(values)

    @classmethod
    def from_fields(cls, values: Mapping[str, Any], label: Callable[[str], str] = str) -> CacheConfig:
        """A config from a mapping of field names to values (the JSON form: enums as their lower-case names).
        ``label`` names a field in error messages as its source knows it (the CLI: a flag, or a config file's
        key)."""
        try:
            check_fields(values, label)
        except ValueError as e:
            raise ValueError(f"config: {e}") from None
        return cls(**values)


def is_checkpoint(model: str) -> bool:
    """Whether ``model`` names a checkpoint directory (not "synthetic", not "module:Class")."""
    return model != "synthetic" and not re.fullmatch(r"[\w.]+:\w+", model)


def resolve_model(values: Mapping[str, Any], label: Callable[[str], str] = str) -> dict[str, Any]:
    """``values`` with what ``values["model"]`` fixes filled in, when it names a checkpoint directory: the path made
    absolute, the geometry (MODEL_FIELDS) from its config.json, the dtype (unless given: the pool may hold another
    dtype than the checkpoint's), after checking that the checkpoint holds every tensor with its shape for ``tp``.
    A given field that contradicts the model is a ValueError naming both. Reads files: the launcher's step, once;
    the config an instance publishes is already resolved."""
    model = values.get("model", "synthetic")
    if not isinstance(model, str) or model == "synthetic":
        return dict(values)
    from mpkv.errors import ModelError

    if not is_checkpoint(model):  # module:Class: importable, and a runner, before anything is started
        from mpkv.model import plugin_class

        try:
            plugin_class(model)
        except ModelError as e:
            raise ValueError(f"{label('model')}: {e}") from None
        return dict(values)
    from mpkv.models.hf_config import read_config
    from mpkv.models.weights import check_checkpoint

    where = Path(model).expanduser().resolve()
    try:
        mc = read_config(where)
        check_checkpoint(where, mc, values.get("tp", 1) if isinstance(values.get("tp", 1), int) else 1)
    except ModelError as e:
        raise ValueError(f"{label('model')}: {e}") from None
    fixed = {field: getattr(mc, field) for field in MODEL_FIELDS}  # ModelConfig spells them as CacheConfig does
    for field, value in fixed.items():
        if field in values and values[field] != value:
            raise ValueError(
                f"{label(field)} ({values[field]!r}) contradicts the model: {where}/config.json has "
                f"{MODEL_FIELDS[field]} = {value}; leave {label(field)} out, the model sets it"
            )
    return {**values, **fixed, "model": str(where), "dtype": values.get("dtype", mc.dtype)}


# -- validation: msgspec checks types and ranges against a Struct derived from CacheConfig's own fields ----------
# Enums travel as their lower-case names; dtype and backend are free strings to Python callers, a closed set here.
_WIRE_TYPES: dict[str, Any] = {
    "dtype": Literal["float16", "bfloat16", "float32"],
    "backend": Literal["cpu", "cuda"],
    "pool_owner": Literal["worker", "transfer"],
    "pd_role": Literal["mixed", "prefill", "decode"],
}


_ENUM_FIELDS = ("pool_owner", "pd_role")


def _wire(value: object, field: str = "") -> object:
    """As msgspec checks it: an enum as its lower-case name; an enum field's string in any case ("TRANSFER", as
    configs written before this check said it, stays valid)."""
    if isinstance(value, IntEnum):
        return value.name.lower()
    return value.lower() if field in _ENUM_FIELDS and isinstance(value, str) else value


def _build_spec() -> tuple[type[msgspec.Struct], dict[str, Any]]:
    hints = get_type_hints(CacheConfig, include_extras=True)
    types = {f.name: _WIRE_TYPES.get(f.name, hints[f.name]) for f in fields(CacheConfig)}
    spec = msgspec.defstruct(
        "CacheConfigFields",
        [(f.name, types[f.name], _wire(f.default)) for f in fields(CacheConfig)],
        kw_only=True,
        frozen=True,
        forbid_unknown_fields=True,
    )
    return spec, types


_SPEC, _TYPES = _build_spec()
assert set(get_args(_TYPES["dtype"])) == set(DTYPE_BYTES)
assert {get_args(_TYPES[f]) for f in ("pool_owner", "pd_role")} == {
    tuple(m.name.lower() for m in PoolOwner),
    tuple(m.name.lower() for m in PdRole),
}
FIELDS = tuple(_TYPES)


def valid_range(field: str) -> str:
    """What ``field`` accepts, in words: 'an integer >= 1', 'one of cpu, cuda'."""
    tp = _TYPES[field]
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(get_args(tp))
    if get_origin(tp) is Annotated:
        base, *metas = get_args(tp)
        meta = next(m for m in metas if isinstance(m, Meta))
        if base is str:
            return f"a string of {meta.min_length}..{meta.max_length} characters"
        what = "an integer" if base is int else f"a {base.__name__}"
        if meta.ge is not None and meta.le is not None:
            return f"{what} in {meta.ge}..{meta.le}"
        return f"{what} >= {meta.ge}"
    return "a string" if tp is str else tp.__name__


def check_value(field: str, value: object) -> object:
    """``value`` checked against ``field``'s type and range; a ValueError saying the range otherwise."""
    try:
        return msgspec.convert(_wire(value, field), _TYPES[field], strict=True)
    except msgspec.ValidationError:
        raise ValueError(f"must be {valid_range(field)}, got {value!r}") from None


def check_fields(values: Mapping[str, Any], label: Callable[[str], str] = str) -> None:
    """Every field's type and range (msgspec, unknown fields refused), then the rules that tie fields together.
    The first problem found is a ValueError of one line that names the field by ``label`` and its range."""
    wire = {k: _wire(v, k) for k, v in values.items()}
    try:
        cfg = msgspec.convert(wire, _SPEC, strict=True)
    except msgspec.ValidationError as e:
        raise ValueError(_diagnose(str(e), values, label)) from None
    tp, kv_heads, port = cfg.tp, cfg.kv_heads, cfg.nixl_port  # type: ignore[attr-defined]
    if kv_heads % tp:
        raise ValueError(f"{label('kv_heads')} ({kv_heads}) must be divisible by {label('tp')} ({tp})")
    if cfg.stable_addresses and cfg.backend != "cuda":  # type: ignore[attr-defined]
        raise ValueError(f"{label('stable_addresses')} needs {label('backend')} cuda (a CUDA virtual-memory pool)")
    if port and not 1024 <= port <= 65535 - tp:
        raise ValueError(f"{label('nixl_port')} must be 0 (off) or a port in 1024..{65535 - tp}, got {port}")


def _diagnose(text: str, values: Mapping[str, Any], label: Callable[[str], str]) -> str:
    """msgspec's ValidationError says where (``- at `$.tp```) and what kind; say it with the value and range."""
    unknown = re.search(r"unknown field `(.*)`", text)
    if unknown:
        return f"unknown field {label(unknown[1])}; the fields are {', '.join(FIELDS)}"
    at = re.search(r" - at `\$\.(\w+)`$", text)
    if at and at[1] in values:
        return f"{label(at[1])} must be {valid_range(at[1])}, got {values[at[1]]!r}"
    return text
