"""Weights from the trainer (NOTE [ weight publications ] in mpkv.publication), through running instances: a trainer
process pushes perturbed weights and generation then equals ``transformers``' greedy ``generate`` with those weights,
at TP=1 and TP=2; a publication made while the instance serves never mixes into a request; bad input is refused by
name and changes nothing; a trainer killed mid-publish leaves the old weights served, its segments reclaimed, and
the next publication working."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import wait as wait_for
from pathlib import Path

import numpy as np
import pytest
import torch
import trainer
from helpers import CTX
from hf_models import BLOCK, NEW_TOKENS, SMALL, perturbed_copy, prompts_for, reference, save_model

import mpkv
from mpkv import Client, Controller, naming
from mpkv.errors import CommandRefused, InstanceNotServing, ModelError, StaleWeights, WeightUpdateFailed

POOL = dict(block_size=BLOCK, device_blocks=32, host_blocks=16)
PROMPTS = prompts_for(int(SMALL["vocab_size"]))  # type: ignore[call-overload]
# A refused request is retried after this pause: a client spinning on refusals would hold the GIL (and a core) that
# the controller in the main thread needs to finish the update it is refused for. Pacing only; nothing waits on it.
REFUSED_BACKOFF_S = 0.005
TRAINER_TIMEOUT_S = 180.0  # a hang guard only: a trainer imports transformers and loads the model


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: save_model(root / arch, arch) for arch in ("llama", "qwen2")}


def _lists(out: list[np.ndarray]) -> list[list[int]]:
    return [o.tolist() for o in out]


def _run(target: object, *args: object) -> None:
    """``target(*args)`` in a spawned process; it must exit 0 within the deadline."""
    p = CTX.Process(target=target, args=args)
    p.start()
    p.join(TRAINER_TIMEOUT_S)
    if p.exitcode is None:
        p.kill()
        p.join()
        pytest.fail(f"the trainer process did not finish within {TRAINER_TIMEOUT_S:g} s")
    assert p.exitcode == 0, f"the trainer process exited with {p.exitcode}"


@pytest.mark.parametrize(("arch", "tp"), [("llama", 1), ("qwen2", 2)])
def test_a_trainer_process_pushes_new_weights(
    models: dict[str, Path], instance: str, tmp_path: Path, arch: str, tp: int
) -> None:
    """A spawned trainer moves every parameter and runs ``weight_update``: generation before equals the old
    reference, after it the reference of exactly the weights pushed, and says so by its weight version."""
    old = reference(models[arch], PROMPTS, NEW_TOKENS)[0]
    with mpkv.launch(instance, tp=tp, model=str(models[arch]), **POOL), Client(instance) as client:
        before = client.generate(PROMPTS, NEW_TOKENS)
        assert _lists(before) == old and before.weight_version == 1
        _run(trainer.push_perturbed, instance, models[arch], tmp_path / "pushed", 2, 5)
        after = client.generate(PROMPTS, NEW_TOKENS)
        new = reference(tmp_path / "pushed", PROMPTS, NEW_TOKENS)[0]
        assert new != old
        assert _lists(after) == new and after.weight_version == 2
        if tp > 1:
            return
        # The same from a shell: the one-call step, then the weights tier through sleep and wake-up.
        assert "needs --from DIR" in _ctl(instance, "update-weights", "--weight-version", "3").stderr
        assert "--tags applies to sleep only" in _ctl(instance, "pause", "--tags", "weights").stderr
        out = _ctl(instance, "update-weights", "--from", str(models[arch]), "--weight-version", "3")
        assert out.returncode == 0 and "serving weight version 3" in out.stdout, out
        out = _ctl(instance, "sleep", "--tags", "weights")
        assert out.returncode == 0 and "released" in out.stdout, out
        assert _ctl(instance, "wake-up").returncode == 0
        back = client.generate(PROMPTS, NEW_TOKENS)
        assert _lists(back) == old and back.weight_version == 3  # the first weights, as version 3


def _ctl(instance: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "mpkv.cli", "ctl", instance, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (path,) = model_dir.glob("*.safetensors")
    return load_file(path)


def test_publish_while_serving_bad_input_and_a_trainer_killed_mid_publish(
    models: dict[str, Path], instance: str, tmp_path: Path
) -> None:
    src = models["qwen2"]
    v2_dir, v3_dir = perturbed_copy(src, tmp_path / "v2", seed=21), perturbed_copy(src, tmp_path / "v3", seed=22)
    refs = {v: reference(d, PROMPTS, NEW_TOKENS)[0] for v, d in ((1, src), (2, v2_dir), (3, v3_dir))}
    assert len({str(r) for r in refs.values()}) == 3
    good = _tensors(v2_dir)
    with (
        mpkv.launch(instance, tp=2, model=str(src), **POOL),
        Client(instance) as client,
        Controller(instance) as ctl,
    ):
        # Bad input: each refused by name before anything is published; the instance serves version 1 on.
        record = ctl.inst.read_weights()
        missing = dict(good)
        del missing["model.layers.1.mlp.down_proj.weight"]
        with pytest.raises(ModelError, match=r"tensor model.layers.1.mlp.down_proj.weight missing"):
            ctl.update_weights(missing, 2)
        with pytest.raises(ModelError, match="tensor 'model.layers.9.extra' is not a parameter of this model"):
            ctl.update_weights({**good, "model.layers.9.extra": torch.zeros(2)}, 2)
        wrong_shape = {**good, "model.norm.weight": torch.zeros(65)}
        with pytest.raises(ModelError, match=r"model.norm.weight has shape \[65\]; the model's is \[64\]"):
            ctl.update_weights(wrong_shape, 2)
        wrong_dtype = {**good, "model.norm.weight": good["model.norm.weight"].half()}
        with pytest.raises(ModelError, match="model.norm.weight is float16; the instance runs float32"):
            ctl.update_weights(wrong_dtype, 2)
        with pytest.raises(ModelError, match="ties it to model.embed_tokens.weight"):
            ctl.update_weights({**good, "lm_head.weight": good["model.embed_tokens.weight"]}, 2)
        with pytest.raises(CommandRefused, match=r"weight version 1 is not newer than the one served \(1\)"):
            ctl.update_weights(good, 1)
        with pytest.raises(CommandRefused, match="weights must be a mapping"):
            ctl.update_weights(42, 2)  # type: ignore[arg-type]
        assert ctl.inst.read_weights() == record
        with (
            pytest.raises(WeightUpdateFailed, match="failed at push: .*is float16.*serves weight version 1 again"),
            ctl.weight_update(2) as push,
        ):
            push(wrong_dtype)
        out = client.generate(PROMPTS, NEW_TOKENS)
        assert _lists(out) == refs[1] and out.weight_version == 1

        # Version 2 published while traffic runs on version 1, then adopted: every request's tokens are those of
        # exactly the version its completion names.
        with Traffic(client) as traffic:
            traffic.another("on version 1")
            published = ctl.update_weights(good, 2)
            assert published.nbytes == sum(t.nbytes for t in good.values())
            traffic.another("after version 2 was published")
            ctl.pause(), ctl.clear(), ctl.restore(2), ctl.resume()
            traffic.another("on version 2", 2)
        assert {v for v, _ in traffic.seen} == {1, 2}
        assert all(tokens == refs[v] for v, tokens in traffic.seen), [v for v, t in traffic.seen if t != refs[v]]

        # A trainer killed mid-publish: version 2 is served on, what it wrote is reclaimed, the next publish works.
        ctl.close()  # the trainer's controller takes the command block (one writer)
        before = _weight_segments(instance)
        halfway, tell = CTX.Pipe(duplex=False)
        p = CTX.Process(target=trainer.publish_and_hang, args=(instance, src, 3, 9, tell))
        p.start()
        try:
            wait_for([halfway, p.sentinel], TRAINER_TIMEOUT_S)
            assert halfway.poll(), f"the trainer never reached the middle of its publication (exit code {p.exitcode})"
            ours = _weight_segments(instance) - before
            assert ours, "the trainer made no weight segment"
        finally:
            if p.exitcode is None:
                os.kill(p.pid, signal.SIGKILL)
            p.join()
        out = client.generate(PROMPTS, NEW_TOKENS)
        assert _lists(out) == refs[2] and out.weight_version == 2
        _eventually(
            lambda: not (ours & _weight_segments(instance)), f"the dead trainer's segments {sorted(ours)} reclaimed"
        )
        with Controller(instance) as ctl, ctl.weight_update(3) as push:  # takes the block over from the dead one
            push(v3_dir)  # a checkpoint directory works as well as tensors
        out = client.generate(PROMPTS, NEW_TOKENS)
        assert _lists(out) == refs[3] and out.weight_version == 3
        # One controller after another in this (live) process: each retires what the slot it overwrites held, so
        # at most the two slots' sets stay.
        for version in (4, 5, 6):
            with Controller(instance) as c:
                c.update_weights(good, version)
        sets = {naming.weights_buffers_of(n) for n in _weight_segments(instance)}
        assert len(sets) <= 2, sorted(_weight_segments(instance))


def _weight_segments(instance: str) -> set[str]:
    return {n for n in naming.list_names() if naming.instance_of(n) == instance and naming.weights_buffers_of(n)}


class Traffic:
    """A thread generating PROMPTS on ``client`` (the test's: one per process; the main thread leaves it alone
    meanwhile) until the block ends; ``seen``: each result's weight version and tokens. A refusal (paused, or a
    restore between two steps: never mixed tokens) is retried."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.seen: list[tuple[int, list[list[int]]]] = []
        self.failed: list[BaseException] = []
        self.stop, self.more = threading.Event(), threading.Condition()
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                try:
                    r = self.client.generate(PROMPTS, NEW_TOKENS, timeout_s=60)
                except (InstanceNotServing, StaleWeights):
                    self.stop.wait(REFUSED_BACKOFF_S)
                    continue
                with self.more:
                    self.seen.append((r.weight_version, _lists(r)))
                    self.more.notify_all()
        except BaseException as e:
            self.failed.append(e)
            with self.more:
                self.more.notify_all()

    def another(self, what: str, version: int | None = None) -> None:
        """Wait (60 s at most) for one more result (of ``version``, if given)."""
        n = len(self.seen)

        def got() -> bool:
            return any(version in (None, v) for v, _ in self.seen[n:])

        with self.more:
            self.more.wait_for(lambda: got() or bool(self.failed), timeout=60)
        assert not self.failed, f"the traffic thread failed: {self.failed[0]!r}"
        assert got(), f"no generation {what} within 60 s"

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, kind: object, *exc: object) -> None:
        self.stop.set()
        self.thread.join(120)
        if kind is None:  # else the body's own exception says more
            assert not self.thread.is_alive(), "the traffic thread did not stop within 120 s"
            assert not self.failed, f"the traffic thread failed: {self.failed[0]!r}"


def _eventually(done: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """Poll a condition another process brings about (the launcher looks every RECLAIM_S); the deadline only
    catches a hang."""
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"not within {timeout_s:g} s: {what}"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_hundred_rl_cycles_with_weight_pushes_under_traffic(
    models: dict[str, Path], instance: str, tmp_path: Path
) -> None:
    """TP=2: 100 ``weight_update`` calls, each pushing one of three weight sets, while a thread generates without
    pause: 0 hangs (every call bounded), 0 tokens that differ from the reference of the version that computed them."""
    src = models["qwen2"]
    sets = [src, *(perturbed_copy(src, tmp_path / f"set{i}", seed=30 + i) for i in (1, 2))]
    refs = [reference(d, PROMPTS, NEW_TOKENS)[0] for d in sets]
    tensors = [_tensors(d) for d in sets]
    with (
        mpkv.launch(instance, tp=2, model=str(src), **POOL),
        Client(instance) as client,
        Controller(instance) as ctl,
        Traffic(client) as traffic,
    ):
        for version in range(2, 102):
            with ctl.weight_update(version, timeout_s=60) as push:
                push(tensors[version % 3])
            traffic.another(f"on version {version}", version)  # a rollout on the new weights, as an RL loop does
    seen = traffic.seen
    wrong = [v for v, tokens in seen if tokens != refs[v % 3 if v > 1 else 0]]
    print(f"[rl] 100 weight updates, {len(seen)} generations checked, {len(wrong)} mismatched")
    assert {v for v, _ in seen} >= set(range(2, 102)) and not wrong, wrong[:5]


def test_a_worker_never_serves_published_weights_under_another_version(models: dict[str, Path]) -> None:
    """The runner alone (no instance): the launch weights may be renamed to a newer version nobody published (a
    controller that writes the control block itself); weights loaded from a publication never are, and a version
    whose publication is incomplete is refused by name, never served with what is held."""
    from mpkv.config import CacheConfig, resolve_model
    from mpkv.models.runner import HFRunner
    from mpkv.publication import Publication

    cfg = CacheConfig(**resolve_model({"model": str(models["llama"])}))
    runner = HFRunner(cfg, 0, torch.device("cpu"), None)
    assert not runner.holds(1, None)
    runner.load(1, None)
    assert runner.holds(1, None) and runner.holds(2, None)  # the launch weights, renamed by an external controller
    runner.load(2, None)
    runner.held = "a-publication-id"  # as after loading one
    assert runner.holds(2, None)  # the version it holds, whatever the record says now
    assert not runner.holds(3, None)
    with pytest.raises(ModelError, match="has no published weights .* holds the weights of version 2"):
        runner.load(3, None)
    gone = Publication(4, "another-id", "0a1b2c3d", complete=False)
    with pytest.raises(ModelError, match="publication of weight version 4 is incomplete"):
        runner.load(4, gone)


@pytest.mark.slow  # ~25 s: two launches' worth of loads and a restore that times out on purpose
def test_a_version_published_again_after_a_timed_out_restore_is_loaded_before_it_is_served(
    instance: str, models: dict[str, Path], tmp_path: Path
) -> None:
    """A restore of version 2 times out after the worker loaded publication A of it; after a full clear, version 2
    is published again (B) and restored. The worker must load B before it acknowledges: it holds version 2, but of
    another publication. (A handshake that let the worker acknowledge together with its pool, on the strength of
    the version alone, served A here.)"""
    from mpkv.instance import CONTROL_COMMAND
    from mpkv.protocol import ActorState, Cmd, Role, actor_slot

    prompts = prompts_for(int(SMALL["vocab_size"]))
    a_dir = perturbed_copy(models["llama"], tmp_path / "A", 5)
    b_dir = perturbed_copy(models["llama"], tmp_path / "B", 7)
    ref_a, ref_b = reference(a_dir, prompts, NEW_TOKENS)[0], reference(b_dir, prompts, NEW_TOKENS)[0]
    assert ref_a != ref_b
    pool = {"block_size": BLOCK, "device_blocks": 32, "host_blocks": 16}
    with mpkv.launch(instance, tp=1, model=str(models["llama"]), **pool), Controller(instance) as ctl:
        ctl.pause()
        ctl.clear()
        ctl.update_weights(str(a_dir), 2)
        messager = ctl.inst.status.read(actor_slot(Role.MESSAGER, 0)).writer.pid
        os.kill(messager, signal.SIGSTOP)  # a slow actor: the restore cannot complete
        try:
            with pytest.raises(mpkv.errors.StepFailed, match="RESTORE@3 failed: messager r0 did not acknowledge"):
                ctl.restore(2, timeout_s=3)
            assert ctl.inst.status.read(actor_slot(Role.WORKER, 0)).value == ActorState.RESTORED  # it loaded A

            def resume_messager() -> None:  # once the clear is issued: the messager then detaches and acknowledges
                ctl.inst.control.wait(CONTROL_COMMAND, lambda s: s.value == Cmd.CLEAR, what="CLEAR", timeout_s=60)
                os.kill(messager, signal.SIGCONT)

            waker = threading.Thread(target=resume_messager)
            waker.start()
            ctl.clear(timeout_s=60)  # both tiers: the way out of an unfinished restore
            waker.join()
        finally:
            os.kill(messager, signal.SIGCONT)
        ctl.update_weights(str(b_dir), 2)
        ctl.restore(2)
        ctl.resume()
        with Client(instance) as client:
            out = _lists(client.generate(prompts, NEW_TOKENS))
        assert out == ref_b and out != ref_a
