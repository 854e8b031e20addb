"""The trainer side of the weight-update tests, run in spawned processes (never in the test process): it loads the
checkpoint with ``transformers`` as a trainer holds its policy, moves every parameter, and pushes the result through
``Controller.weight_update``, or stops half-way through a publication for the test to kill it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch


def perturbed_policy(model_dir: Path, seed: int) -> Any:
    """The checkpoint in ``model_dir`` as a transformers model, every parameter moved by seeded noise."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def push_perturbed(name: str, model_dir: Path, out_dir: Path, weight_version: int, seed: int) -> None:
    """Perturb, save what was pushed (the test's reference reads it), push it as ``weight_version``."""
    from mpkv import Controller

    model = perturbed_policy(model_dir, seed)
    model.save_pretrained(out_dir)
    with Controller(name) as ctl, ctl.weight_update(weight_version) as push:
        push(model.named_parameters())


def publish_and_hang(name: str, model_dir: Path, weight_version: int, seed: int, halfway: Any) -> None:
    """Start publishing ``weight_version`` (without pausing: the instance serves on) and stop after the first
    tensor is copied, in the middle of the publication, until killed."""
    from mpkv import Controller
    from mpkv.publication import Draft

    put = Draft.put
    count = [0]

    def put_then_hang(self: Draft, tensor_name: str, tensor: torch.Tensor) -> None:
        put(self, tensor_name, tensor)
        count[0] += 1
        if count[0] == 1:
            halfway.send(True)
            while True:
                time.sleep(60)  # the test kills this process with SIGKILL

    Draft.put = put_then_hang  # type: ignore[method-assign]
    model = perturbed_policy(model_dir, seed)
    with Controller(name) as ctl:
        ctl.update_weights(dict(model.named_parameters()), weight_version)
