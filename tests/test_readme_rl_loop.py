"""The RL loop of the README, run as written (on a tiny seeded Llama): after three weight updates, generation
equals ``transformers``' greedy ``generate`` with the trainer's final weights, and says it is weight version 4."""

from __future__ import annotations

import re
from pathlib import Path

from hf_models import reference, save_model

README = Path(__file__).resolve().parent.parent / "README.md"


def rl_loop() -> str:
    """The fenced block after the ``<!-- rl-loop -->`` marker."""
    found = re.search(r"<!-- rl-loop -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert found, "README.md has no <!-- rl-loop --> python block"
    return found.group(1)


def test_the_readme_rl_loop(instance: str, tmp_path: Path) -> None:
    code = rl_loop()
    lines = [line for line in code.splitlines() if line.strip()]
    assert len(lines) <= 15, f"the README's RL loop grew to {len(lines)} lines"
    model = save_model(tmp_path / "model", "llama")
    ns: dict[str, object] = {"MODEL": str(model)}
    exec(compile(code.replace('"rl0"', repr(instance)), "README.md <!-- rl-loop -->", "exec"), ns)
    final, policy, prompts = ns["final"], ns["policy"], ns["prompts"]
    assert final.weight_version == 4  # type: ignore[attr-defined]
    policy.save_pretrained(tmp_path / "trained")  # type: ignore[attr-defined]
    want = reference(tmp_path / "trained", prompts, 8)[0]  # type: ignore[arg-type]
    first = reference(model, prompts, 8)[0]  # type: ignore[arg-type]
    assert want != first, "the loop did not change the weights: the check below would prove nothing"
    assert [t.tolist() for t in final] == want  # type: ignore[attr-defined]
