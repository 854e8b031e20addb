"""The judgement of a cuda clear on NVML's figures (mpkv.pool.release): plain data in, sentences out."""

from __future__ import annotations

from mpkv.pool.release import TOLERANCE_BYTES, Figures, leftovers

MiB = 1 << 20
POOL = 2048 * MiB
CONTEXT = 500 * MiB  # what a process with a CUDA context holds whatever it frees


def _rank(owner_after: int, attacher_after: int, floor: int | None = None) -> list[Figures]:
    return [
        Figures("worker r0", 101, CONTEXT + POOL, owner_after, floor, owner=True),
        Figures("transfer r0", 102, CONTEXT, attacher_after, floor, owner=False),
    ]


def test_a_clear_that_gave_the_pool_back_passes() -> None:
    assert leftovers(_rank(CONTEXT, CONTEXT), POOL) == []
    assert leftovers(_rank(CONTEXT + TOLERANCE_BYTES // 2, CONTEXT, floor=CONTEXT), POOL) == []


def test_an_owner_whose_pool_is_still_held_is_named_with_its_figures() -> None:
    # torch's IPC limbo did exactly this: the owner dropped its tensor, NVML saw nothing released
    (only,) = leftovers(_rank(CONTEXT + POOL, CONTEXT), POOL)
    assert only.startswith("worker r0 (pid 101) freed its 2 GiB pool, but NVML shows it released only 0 B")
    assert "2.5 GiB -> 2.5 GiB" in only


def test_a_process_holding_more_than_after_the_previous_clear_is_named() -> None:
    (only,) = leftovers(_rank(CONTEXT, CONTEXT + 300 * MiB, floor=CONTEXT), POOL)
    assert only.startswith("transfer r0 (pid 102) holds 300 MiB more GPU memory than after the previous clear")
    # without a previous clear there is nothing to compare an attacher with: it is not judged
    assert leftovers(_rank(CONTEXT, CONTEXT + 300 * MiB), POOL) == []


def test_figures_nvml_does_not_have_are_not_judged() -> None:
    figures = [Figures("worker r0", 101, None, None, None, owner=True), Figures("worker r1", 201, POOL, None, 0, True)]
    assert leftovers(figures, POOL) == []
