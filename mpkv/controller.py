"""`mpkv.Controller`: the RL trainer's handle on an instance. It only writes the command block.

Each step writes (Cmd, epoch + 1, aux) into the command word, then waits for every actor of every rank to
acknowledge at that epoch (``ACK_OF``), failing fast, by name, on an actor that FAILED (its error record is
quoted) or died. Admission rules (already paused, clear before restore, ...) are ``handshake.check_command``.
The byte-level protocol, for trainers in other languages: docs/control-block.md.
"""

from __future__ import annotations

import contextlib
import operator
import os
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpkv import naming, status
from mpkv.config import is_checkpoint
from mpkv.errors import (
    CommandRefused,
    MemoryHeld,
    ModelError,
    MpkvError,
    PeerDied,
    StepFailed,
    TornSlot,
    WaitTimeout,
    WeightUpdateFailed,
)
from mpkv.handshake import Command, check_command, step_done
from mpkv.instance import (
    CONTROL_COMMAND,
    CONTROL_FENCE,
    CONTROL_LEDGER,
    FENCE_CLOSING,
    Instance,
    controller_wait_slot,
)
from mpkv.layout import SegmentKind
from mpkv.protocol import (
    ACK_OF,
    MAX_WEIGHT_VERSION,
    ROLES,
    ActorState,
    ClearFlags,
    Cmd,
    Role,
    WaitKind,
    actor_name,
    actor_slot,
    pack_slots,
    slot_actor,
)
from mpkv.publication import Publication, Publications
from mpkv.report import InstanceStatus
from mpkv.shm.proc import ProcId, Watch
from mpkv.shm.ring import quiesce
from mpkv.shm.segment import Segment
from mpkv.shm.signals import Signal, SignalWriter
from mpkv.shm.waiting import LIVENESS_SLICE_S, TIMED_OUT, WakeSet, Word, check_timeout
from mpkv.topology import pack_ledger, pool_owner

if TYPE_CHECKING:
    from mpkv.publication import Publisher

S = ActorState


@dataclass
class StepResult:
    command: str
    epoch: int
    already: bool = False
    message: str = ""
    latency_s: float = 0.0
    released_bytes: dict[str, int] = field(default_factory=dict)  # per actor, as each measured it
    shm_released_bytes: int = 0  # /dev/shm usage before minus after (cpu backend), as the controller measured it
    gpu_bytes: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)  # cuda clear: per actor, NVML
    # before and after (None: NVML has no figure; ``gpu_note`` says why)
    gpu_note: str = ""


def _release_claims(writers: tuple[SignalWriter[Any], ...]) -> None:
    for w in writers:
        w.release()


def shm_used_bytes() -> int:
    st = os.statvfs(naming.SHM_DIR)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@dataclass
class Published:
    """What ``update_weights`` did: the version, the bytes copied, how long it took, whether it reused buffers."""

    weight_version: int
    nbytes: int
    seconds: float
    buckets: int
    reused: bool


SLEEP_TAGS = ("kv_cache", "weights")  # what sleep() frees: the KV tiers (device and host), the workers' weights
NamedTensors = Mapping[str, Any] | Iterable[tuple[str, Any]]
WeightsIn = NamedTensors | str | os.PathLike[str]  # tensors by name, or a checkpoint directory


class Controller:
    def __init__(self, name: str, timeout_s: float = 60.0) -> None:
        self.inst = Instance.attach(name)
        self.name, self.timeout_s, self.cfg = name, timeout_s, self.inst.cfg
        self._writers: tuple[SignalWriter[Cmd], SignalWriter[Cmd], SignalWriter[WaitKind]] | None = None
        self._release: Callable[[], object] = lambda: None
        self._fences: dict[Role, SignalWriter[Cmd]] = {}
        self._rings: dict[Role, Segment] = {}  # the task rings, mapped at the first PAUSE, for the drain fences
        self._words: list[Word] = []
        self._watch = Watch()  # the actors' liveness, at every step: a pidfd each instead of a /proc read
        weakref.finalize(self, self._watch.close)  # also when the Controller is dropped without close()
        self._publisher: Publisher | None = None

    def _claim(self) -> tuple[SignalWriter[Cmd], SignalWriter[Cmd], SignalWriter[WaitKind]]:
        """Become the one writer of the command block, at the first command (``status`` needs no claim)."""
        if self._writers is None:
            claimed: list[SignalWriter[Any]] = []
            try:
                # A command word torn by a controller killed mid-write is repaired as a PAUSE at a new epoch: it
                # drains, never frees and never serves (its zero member, NONE, would read as "run").
                claimed.append(self.inst.control.writer(CONTROL_COMMAND, lambda epoch, aux: (Cmd.PAUSE, epoch + 1, 0)))
                claimed.append(self.inst.control.writer(CONTROL_LEDGER))
                claimed.append(self.inst.waits.writer(controller_wait_slot(self.cfg.tp)))
                fences = {}
                for role, slot in CONTROL_FENCE.items():
                    fences[role] = self.inst.control.writer(slot)
                    claimed.append(fences[role])
            except BaseException:
                _release_claims(tuple(claimed))  # all of the block or nothing
                raise
            self._writers = (claimed[0], claimed[1], claimed[2])
            self._fences = fences
            try:
                self.inst.read_weights()
            except PeerDied:  # a controller died writing it: what it named is lost (the launcher reclaims those)
                self.inst.write_weights(Publications())
            cmd = self.inst.control.read(CONTROL_COMMAND)
            for fence in fences.values():  # one a dead controller left while closing: it issued nothing
                if fence.array.read_or_dead(fence.slot).epoch > cmd.epoch:
                    fence.write(Cmd.NONE, cmd.epoch, 0)
            # Also when the Controller is dropped without close(): the claims must not outlive their holder.
            self._release = weakref.finalize(self, _release_claims, (*self._writers, *self._fences.values()))
        return self._writers

    def _close_rings(self, kind: Cmd, epoch: int, last: Command, deadline: float) -> None:
        """Before a PAUSE or SHUTDOWN: find, per task ring, the position every reader drains up to, and publish it
        (NOTE [ submission gate ] in mpkv.shm.ring). Clients refuse new tasks from the first write on."""
        positions: dict[Role, int] = {}
        try:
            for w in self._fences.values():
                w.write(kind, epoch, FENCE_CLOSING)
            for role in self._fences:
                seg = self._rings.get(role)
                if seg is None:
                    seg = self._rings[role] = Segment.attach(self.inst.task_ring(role), SegmentKind.RING)
                what = f"the client to finish a put into tasks.{role.name.lower()} before {kind.name}@{epoch}"
                positions[role] = quiesce(seg, what=what, timeout_s=max(1e-3, deadline - time.monotonic()))
        except BaseException as e:  # not issued (timed out, interrupted): clients may submit again
            for fence in self._fences.values():
                fence.write(Cmd.NONE, last.epoch, 0)
            if isinstance(e, WaitTimeout):
                raise StepFailed(f"{kind.name}@{epoch} was not issued: {e}") from None
            raise
        for role, w in self._fences.items():
            w.write(kind, epoch, positions[role])

    # -- the RL transaction ---------------------------------------------------------------------------------
    def pause(self, timeout_s: float | None = None) -> StepResult:
        return self._step(Cmd.PAUSE, 0, timeout_s)

    def clear(
        self, device: bool = True, host: bool = True, timeout_s: float | None = None, *, weights: bool = False
    ) -> StepResult:
        """Free the tiers named: the device and host KV pools, and (``weights``) the workers' model weights, which
        the next restore loads again from what was published for its weight version. ``released_bytes``: what
        each actor freed, as it measured it."""
        flags = (
            (ClearFlags.DEVICE if device else 0)
            | (ClearFlags.HOST if host else 0)
            | (ClearFlags.WEIGHTS if weights else 0)
        )
        if not flags:
            raise CommandRefused("clear needs device=True, host=True, weights=True or a combination")

        def prepare(last: Command, done: bool, cleared: ClearFlags, served: int) -> None:
            if weights and is_checkpoint(self.cfg.model):
                self._check_reloadable(served)

        before = shm_used_bytes()
        gpu_before = self._gpu_figures() if self.cfg.backend == "cuda" else {}
        res = self._step(Cmd.CLEAR, int(flags), timeout_s, prepare)
        if gpu_before and not res.already:
            self._check_gpu_release(res, gpu_before, device)
        if not res.already:
            res.shm_released_bytes = before - shm_used_bytes()
            # (The workers' weights, when cleared, are private memory: released, but not from /dev/shm.)
            freed = sum(res.released_bytes.values())
            if self.cfg.backend == "cpu" and device and res.shm_released_bytes < freed:
                # Less left /dev/shm than the actors freed: either another program allocated meanwhile, or some
                # process still maps a freed pool. The slow check tells which (and names the process).
                self._check_unmapped()
        return res

    def restore(
        self, weight_version: int | None = None, timeout_s: float | None = None, *, weights_from: str | None = None
    ) -> StepResult:
        """Re-allocate the cleared tiers and adopt ``weight_version`` (default: the one served): every worker loads
        the weights published for it before it acknowledges. On an instance of a checkpoint, a version other than
        the one served must have been published (``update_weights``); ``weights_from=DIR`` publishes a checkpoint
        directory of the same model as that version first. The synthetic model is seeded by any version."""
        wv = self._version(self.weight_version if weight_version is None else weight_version)

        def prepare(last: Command, done: bool, cleared: ClearFlags, served: int) -> None:
            if weights_from is not None:
                self.update_weights(weights_from, wv)
            if is_checkpoint(self.cfg.model):
                retry = last.kind == Cmd.RESTORE and last.aux == wv and not done
                self._check_restore(wv, cleared, served, retry)

        return self._step(Cmd.RESTORE, wv, timeout_s, prepare)

    def _version(self, weight_version: object) -> int:
        try:
            wv = operator.index(weight_version)  # type: ignore[arg-type]
        except TypeError:
            wv = -1
        if isinstance(weight_version, bool) or not 0 <= wv <= MAX_WEIGHT_VERSION:
            raise CommandRefused(
                f"a weight version is an integer from 0 to {MAX_WEIGHT_VERSION}, got {weight_version!r}"
            )
        return wv

    def _check_restore(self, wv: int, cleared: ClearFlags, served: int, retry: bool) -> None:
        """A checkpoint instance's restore to ``wv``, admitted: a version not older than the one served, published
        unless it is the one served, loadable if the workers will load it. ``retry``: the same restore again, after
        one that was not acknowledged."""
        if wv < served:
            raise CommandRefused(
                f"restore of {self.name}: weight version {wv} is older than the one served ({served}); weight "
                "versions only grow (the KV of every tier is named by them)"
            )
        record = self.inst.read_weights()
        pub = record.find(wv)
        if pub is None and wv != served:
            named = record.named(wv)
            why = "was never published" if named is None else "has an incomplete publication (its publisher exited)"
            raise CommandRefused(
                f"restore of {self.name}: weight version {wv} {why}; publish it first "
                f"(Controller.update_weights(weights, {wv}), or restore(..., weights_from=DIR))"
            )
        if ClearFlags.WEIGHTS in cleared and not retry:
            self._check_reloadable(wv)
        if pub is not None and pub.backend == "cuda" and (wv != served or ClearFlags.WEIGHTS in cleared):
            self._check_cuda_source(pub, wv)  # the workers will load from its memory

    def _check_reloadable(self, wv: int) -> None:
        """The weights of ``wv`` (the version served) can be loaded again after a weights clear."""
        pub = self.inst.read_weights().find(wv)
        if pub is None and wv != self.cfg.weight_version:
            raise CommandRefused(
                f"{self.name}: the weights of version {wv} could not be loaded again: no publication of it is left "
                "(a cuda publisher exited, or a controller restored it without one); publish a new version instead"
            )
        if pub is not None and pub.backend == "cuda":
            self._check_cuda_source(pub, wv)

    def _check_cuda_source(self, pub: Publication, wv: int) -> None:
        """A cuda publication lives in its publisher's memory (mpkv.publication): loadable while that process is."""
        if not ProcId(pub.writer, pub.writer_start).alive():
            raise CommandRefused(
                f"{self.name}: the weights of version {wv} lived in the CUDA memory of process {pub.writer}, which "
                "exited; publish a new version (update_weights) and restore that"
            )

    # -- weights from the trainer -----------------------------------------------------------------------------------
    def update_weights(self, weights: WeightsIn, weight_version: int) -> Published:
        """Publish ``weights`` as ``weight_version`` for the instance (NOTE [ weight publications ] in
        mpkv.publication): a mapping (or pairs) of Hugging Face parameter names to full, unsharded tensors in the
        instance's dtype, or a checkpoint directory of the same model. Every name, shape and dtype is checked
        against the model before anything is published: a mismatch is a ModelError naming the tensor, and nothing
        changes. The instance goes on serving what it serves; ``restore(weight_version)`` loads them."""
        wv = self._check_publish(weight_version)
        named = self._checked_weights(weights)
        t0 = time.perf_counter()
        draft = self._publisher_of().begin(wv, self.weight_version)
        for name, tensor in named:
            draft.put(name, tensor)
        draft.finish()
        return Published(wv, draft.bytes, time.perf_counter() - t0, len(draft.bufs.sizes), draft.reused)

    def _check_publish(self, weight_version: object) -> int:
        wv = self._version(weight_version)
        if not is_checkpoint(self.cfg.model):
            raise CommandRefused(
                f"instance {self.name} runs the model {self.cfg.model!r}, which has no named weights to update; "
                "update_weights needs an instance launched with --model DIR"
            )
        self._claim()  # the one writer of the weights record is the holder of the command block
        last, statuses, _, served = status.settled(self.inst)
        if last.kind == Cmd.SHUTDOWN:
            raise CommandRefused(f"update_weights refused for instance {self.name}: it is shutting down")
        if not step_done(last, statuses):
            raise CommandRefused(
                f"update_weights refused for instance {self.name}: {last.kind.name}@{last.epoch} is not acknowledged "
                "by every actor and a worker may still be reading weights; retry that step (or clear both tiers) first"
            )
        if wv <= served:
            raise CommandRefused(
                f"update_weights refused for instance {self.name}: weight version {wv} is not newer than the one "
                f"served ({served}); new weights need a higher weight version"
            )
        return wv

    def _checked_weights(self, weights: object) -> Iterable[tuple[str, Any]]:
        """Every tensor of ``weights``, checked against the model (names, shapes, dtypes), in the model's order."""
        import torch

        from mpkv.publication import check_tensor, expected_tensors

        pub = self._publisher_of()
        expected = expected_tensors(pub.model_cfg)
        if isinstance(weights, (str, os.PathLike)):
            return self._checkpoint_tensors(Path(weights), expected, pub.dtype)
        if isinstance(weights, Mapping):
            pairs = list(weights.items())
        elif isinstance(weights, Iterable) and not isinstance(weights, (bytes, torch.Tensor)):
            pairs = list(weights)
        else:
            raise CommandRefused(
                f"weights must be a mapping of parameter names to tensors (or (name, tensor) pairs) or a checkpoint "
                f"directory, got {type(weights).__name__}"
            )
        seen: dict[str, Any] = {}
        for pair in pairs:
            if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)):
                raise CommandRefused(f"weights: expected (name, tensor) pairs, got {pair!r:.80}")
            name, tensor = pair
            if name == "lm_head.weight" and pub.model_cfg.tie_embeddings:
                raise ModelError(
                    "tensor lm_head.weight: this model ties it to model.embed_tokens.weight; push the embedding only "
                    "(as named_parameters() gives it); nothing was published"
                )
            if name in seen:
                raise ModelError(f"tensor {name} is given twice; nothing was published")
            check_tensor(name, tensor, expected.get(name), pub.dtype)
            seen[name] = tensor
        missing = [n for n in expected if n not in seen]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise ModelError(
                f"tensor {', '.join(missing[:3])}{more} missing: push every parameter; nothing was published"
            )
        return [(n, seen[n]) for n in expected]

    def _checkpoint_tensors(
        self, path: Path, expected: Mapping[str, tuple[int, ...]], dtype: Any
    ) -> Iterator[tuple[str, Any]]:
        """The checkpoint's tensors, checked (config, every shape) now and read one at a time as they are copied,
        converted to the instance's dtype on the way: never the whole checkpoint in memory."""
        from mpkv.models.hf_config import read_config
        from mpkv.models.runner import check_same_model
        from mpkv.models.weights import _Checkpoint, _Part, check_checkpoint

        path = path.expanduser().resolve()
        held = self._publisher_of().model_cfg
        check_same_model(held, read_config(path), f"{path}/config.json")
        check_checkpoint(path, held, 1)
        ckpt = _Checkpoint(path)
        return ((name, ckpt.read(_Part(name, shape)).to(dtype)) for name, shape in expected.items())

    def _publisher_of(self) -> Publisher:
        if self._publisher is None:
            from mpkv.models.hf_config import read_config
            from mpkv.publication import Publisher

            self._publisher = Publisher(self.inst, read_config(self.cfg.model), self.cfg.torch_dtype)
        return self._publisher

    # -- one-call steps -----------------------------------------------------------------------------------------------
    def sleep(self, tags: Iterable[str] = SLEEP_TAGS, timeout_s: float | None = None) -> StepResult:
        """Pause, then clear what ``tags`` names: ``kv_cache`` (the device and host KV tiers), ``weights`` (the
        workers' weights). ``wake_up`` brings it back."""
        tags = (tags,) if isinstance(tags, str) else tuple(tags)
        unknown = [t for t in tags if t not in SLEEP_TAGS]
        if unknown or not tags:
            raise CommandRefused(f"sleep: tags must be some of {', '.join(SLEEP_TAGS)}; got {list(tags)}")
        kv = "kv_cache" in tags
        self.pause(timeout_s)
        return self.clear(device=kv, host=kv, weights="weights" in tags, timeout_s=timeout_s)

    def wake_up(self, weight_version: int | None = None, timeout_s: float | None = None) -> StepResult:
        """Restore (``weight_version``: default, the one served; else a published one) and resume."""
        self.restore(weight_version, timeout_s)
        return self.resume(timeout_s)

    @contextlib.contextmanager
    def weight_update(
        self, weight_version: int, timeout_s: float | None = None
    ) -> Iterator[Callable[[WeightsIn], None]]:
        """``with ctl.weight_update(v) as push: push(named_tensors)``: pause, clear both KV tiers, publish what is
        pushed (in as many calls as the trainer likes, each checked as it comes), restore ``v`` and resume. On any
        failure a WeightUpdateFailed names the step and the instance is back on the weights it served before (or
        the error says why it could not be)."""
        wv = self._check_publish(weight_version)
        old, step = self.weight_version, "pause"
        try:
            self.pause(timeout_s)
            step = "clear"
            self.clear(timeout_s=timeout_s)  # no KV of the old version survives (I7)
            step = "push"
            draft = self._publisher_of().begin(wv, self.weight_version)
            dtype = self._publisher_of().dtype

            def push(named: WeightsIn) -> None:
                for name, tensor in self._pairs(named, dtype):
                    draft.put(name, tensor)

            yield push
            step = "publish"
            draft.finish()
            step = "restore"
            self.restore(wv, timeout_s)
            step = "resume"
            self.resume(timeout_s)
        except Exception as e:
            raise WeightUpdateFailed(self._roll_back(wv, old, step, e)) from e
        except BaseException as e:  # Ctrl-C in the middle: back to the old weights, then let it through
            self._roll_back(wv, old, step, MpkvError(type(e).__name__))
            raise

    def _pairs(self, named: object, dtype: Any) -> Iterable[tuple[str, Any]]:
        """What one ``push`` gives: a mapping, (name, tensor) pairs, or a checkpoint directory (read lazily)."""
        if isinstance(named, (str, os.PathLike)):
            from mpkv.publication import expected_tensors

            return self._checkpoint_tensors(Path(named), expected_tensors(self._publisher_of().model_cfg), dtype)
        if isinstance(named, Mapping):
            return list(named.items())
        pairs = list(named)  # type: ignore[call-overload]
        if not all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in pairs):
            raise CommandRefused("push takes a mapping of parameter names to tensors, or (name, tensor) pairs")
        return pairs

    def _roll_back(self, wv: int, old: int, step: str, error: Exception) -> str:
        what = f"weight update of {self.name} to version {wv} failed at {step}: {error}"
        if step in ("restore", "resume"):
            return f"{what}; the instance is not serving (see `mpkv ctl {self.name} status`): shut it down"
        try:
            self.restore(old)
            self.resume()
        except MpkvError as again:
            return f"{what}; going back to weight version {old} failed too: {again}"
        return f"{what}; the instance serves weight version {old} again"

    def resume(self, timeout_s: float | None = None) -> StepResult:
        return self._step(Cmd.RESUME, 0, timeout_s)

    def shutdown(self, timeout_s: float | None = None) -> StepResult:
        res = self._step(Cmd.SHUTDOWN, 0, timeout_s)
        rings, self._rings = self._rings, {}  # their names are gone with the instance: let the memory go too
        for seg in rings.values():
            seg.close()
        return res

    # -- state ----------------------------------------------------------------------------------------------
    @property
    def weight_version(self) -> int:
        """The weight version of the KV in the pools (a RESTORE counts once every actor acknowledged it)."""
        return status.settled(self.inst)[3]

    def status(self) -> InstanceStatus:
        """The instance's status record (mpkv.report; `mpkv ctl NAME status --json` is its JSON)."""
        return status.read_status(self.inst)

    def close(self) -> None:
        """Give up the command block (another controller, e.g. `mpkv ctl` in a shell, may then drive the instance)
        and unmap the instance. A controller that is never closed holds the block until its process exits. Weights
        it published stay (cpu) for the instance to load; on cuda they go with it."""
        publisher, self._publisher = self._publisher, None
        rings, self._rings = self._rings, {}
        try:
            if publisher is not None:
                publisher.close()
        finally:
            for seg in rings.values():
                seg.close()
            self._watch.close()
            self._release()
            self.inst.close()

    def __enter__(self) -> Controller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one step ---------------------------------------------------------------------------------------------
    def _step(
        self, kind: Cmd, aux: int, timeout_s: float | None, prepare: Callable[..., None] | None = None
    ) -> StepResult:
        """Issue ``kind`` and wait for every acknowledgement. ``prepare(last, done, cleared, weight_version)``
        runs once the command is admitted, before the command block is written (a restore's ``weights_from`` is
        published there, before the checks that may still refuse it)."""
        wait_s = check_timeout(self.timeout_s if timeout_s is None else timeout_s)
        cmd_w, ledger_w, _ = self._claim()  # before reading the block: a claim repairs a slot torn by a dead writer
        last, statuses, cleared, weight_version = status.settled(self.inst, self._watch.alive)
        done = step_done(last, statuses)
        refusal = check_command(kind, aux, last, cleared, weight_version, done)
        if refusal is not None:
            if refusal.already:
                return StepResult(kind.name, last.epoch, already=True, message=refusal.message)
            raise CommandRefused(f"{kind.name.lower()} refused for instance {self.name}: {refusal.message}")
        if prepare is not None:
            prepare(last, done, cleared, weight_version)
        if (cleared, weight_version) != status.ledger(self.inst):
            # What the last command settled (a CLEAR issued, a RESTORE acknowledged after its controller gave up
            # waiting, or either by a controller that died before it wrote the ledger): record it now.
            ledger_w.write(last.kind, last.epoch, pack_ledger(weight_version, cleared))
        epoch = last.epoch + 1
        t0 = time.perf_counter()
        deadline = time.monotonic() + wait_s
        if kind in (Cmd.PAUSE, Cmd.SHUTDOWN):
            self._close_rings(kind, epoch, last, deadline)
        cmd_w.write(kind, epoch, aux)
        if kind == Cmd.CLEAR:  # after the command (settled_ledger counts the command word itself from now on)
            ledger_w.write(kind, epoch, pack_ledger(weight_version, cleared | ClearFlags(aux)))
        acks = self._wait_acks(kind, epoch, wait_s, deadline)
        res = StepResult(kind.name, epoch, latency_s=time.perf_counter() - t0)
        if kind == Cmd.CLEAR:
            res.released_bytes = {name: sig.aux for name, sig in acks.items()}
        elif kind == Cmd.RESTORE:
            ledger_w.write(kind, epoch, pack_ledger(aux, ClearFlags(0)))
        return res

    def _wait_acks(self, kind: Cmd, epoch: int, timeout_s: float, deadline: float) -> dict[str, Signal[ActorState]]:
        """Every actor's acknowledgement of ``kind``@``epoch`` by ``deadline`` (the step's: ``timeout_s`` after it
        began). One loop for all of them: each pass reads again only the slots whose sequence word moved (a FAILED
        anywhere ends the step within a slice), then sleeps on the first actor not done yet. Sleeping on all of them
        (futex_waitv) was measured worse: every acknowledgement woke the controller, and on 2 cores each wake-up
        costs ~0.1 ms; the first one not done is the one the step waits for anyway, and the others have mostly
        acknowledged by then. Between slices, and after a slice nobody wrote in, it checks that the actors it still
        waits for are alive (invariant I2), and rereads them all."""
        target = ACK_OF[kind]
        wait_w = self._claim()[2]
        step = f"{kind.name}@{epoch}"
        pending = [actor_slot(role, rank) for rank in range(self.cfg.tp) for role in ROLES]
        acks: dict[str, Signal[ActorState]] = {}
        shown: list[int] = []
        seen: dict[int, int] = {}  # slot -> its sequence word when last read: an unchanged slot is not read again
        words = self._status_words()
        checked = time.monotonic()
        try:
            while True:
                watched = pending[0]
                wake = WakeSet()
                wake.add(words[watched])
                wake.snapshot()  # before reading the slots: a write after it ends the sleep below at once
                still = []
                for slot in pending:
                    seq = words[slot].load()
                    if seen.get(slot) == seq:
                        still.append(slot)
                        continue
                    seen[slot] = seq
                    sig = self._read_status(slot, step)
                    if sig.value in (S.FAILED, S.STOPPED) or sig.at_least(target, epoch):
                        if sig.value == S.FAILED or (sig.value == S.STOPPED and kind != Cmd.SHUTDOWN):
                            raise StepFailed(f"{step} failed: {self.inst.culprits()}")
                        acks[actor_name(*slot_actor(slot))] = sig
                    else:
                        still.append(slot)
                pending = still
                if not pending:
                    return acks
                if pending[0] != watched:
                    continue  # the one watched is done: watch the next one, from a new snapshot, before sleeping
                if pending[:4] != shown:  # what the controller waits for, for mpkv-top and `ctl status`
                    shown = pending[:4]
                    wait_w.write(WaitKind.ACKS, time.monotonic_ns(), pack_slots(shown), wake=False)
                now = time.monotonic()
                if now >= deadline:
                    who = actor_name(*slot_actor(pending[0]))
                    chain = self.inst.wait_chain(pending[0])
                    raise StepFailed(f"{step} failed: {who} did not acknowledge within {timeout_s:g} s: {chain}")
                if now - checked >= LIVENESS_SLICE_S:
                    checked = now
                    self._check_alive(pending, step)
                if wake.sleep(min(LIVENESS_SLICE_S, deadline - now)) == TIMED_OUT:
                    checked = 0.0  # a whole slice without a word from the first: look at everyone now
        finally:  # the wait is over, however it ended
            wait_w.write(WaitKind.NONE, time.monotonic_ns(), 0, wake=False)

    def _status_words(self) -> list[Word]:
        """Every status slot's futex word (its sequence word), by slot: made once."""
        if not self._words:
            self._words = [self.inst.status.word(slot) for slot in range(len(ROLES) * self.cfg.tp)]
        return self._words

    def _read_status(self, slot: int, step: str) -> Signal[ActorState]:
        """An actor's status slot; one left mid-write by a writer that died or stuck fails the step by name."""
        try:
            return self.inst.status.read(slot)
        except (TornSlot, PeerDied):
            raise StepFailed(f"{step} failed: {self.inst.culprits()}") from None

    def _check_alive(self, slots: list[int], step: str) -> None:
        """Fail the step, naming the culprits, if an actor it waits for died without a word (kill -9)."""
        for slot in slots:
            sig = self._read_status(slot, step)
            if sig.seq and not self._watch.alive(sig.writer):
                raise StepFailed(f"{step} failed: {self.inst.culprits()}")

    def _gpu_figures(self) -> dict[str, tuple[int, int | None]]:
        """Every actor's pid and GPU memory as NVML sees it now (``mpkv.gpumem``), by actor name."""
        from mpkv.gpumem import GpuMemory

        pids = {
            actor_name(role, rank): self.inst.status.read(actor_slot(role, rank)).writer.pid
            for rank in range(self.cfg.tp)
            for role in ROLES
        }
        got = GpuMemory.open().process_bytes(pids.values())
        return {who: (pid, got.get(pid)) for who, pid in pids.items()}

    def _check_gpu_release(self, res: StepResult, before: dict[str, tuple[int, int | None]], device: bool) -> None:
        """cuda: each actor's NVML figures before and after the clear go in ``res``; after a device clear, an owner
        still holding its pool (or a process holding more than before) is a MemoryHeld naming it."""
        from mpkv.gpumem import GpuMemory
        from mpkv.pool.release import Figures, leftovers

        after = self._gpu_figures()
        res.gpu_bytes = {who: (b, after[who][1]) for who, (_, b) in before.items()}
        res.gpu_note = GpuMemory.open().note
        if not device:
            return
        owners = {actor_name(pool_owner(self.cfg), rank) for rank in range(self.cfg.tp)}
        figures = [Figures(who, pid, b, after[who][1], who in owners) for who, (pid, b) in before.items()]
        held = leftovers(figures, self.cfg.pool_bytes(self.cfg.device_blocks))
        if held:
            raise MemoryHeld(f"{res.command}@{res.epoch} of {self.name} was acknowledged, but " + "; ".join(held))

    def _check_unmapped(self) -> None:
        """After a clear, no actor may still map a device pool of this instance (the memory would not be free)."""
        if self.cfg.backend != "cpu":
            return
        prefix = self.inst.name_of(naming.DEVICE_POOL).lstrip("/")
        for rank in range(self.cfg.tp):
            for role in ROLES:
                pid = self.inst.status.read(actor_slot(role, rank)).writer.pid
                try:
                    with open(f"/proc/{pid}/maps") as f:
                        stale = [line.split()[-2] for line in f if prefix in line]
                except OSError:
                    continue
                if stale:
                    raise StepFailed(f"clear failed: {actor_name(role, rank)} (pid {pid}) still maps {stale[0]}")
