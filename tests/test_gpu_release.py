"""The judgement of a cuda clear on NVML's figures (mpkv.pool.release): plain data in, sentences out."""

from __future__ import annotations

from mpkv.pool.release import TOLERANCE_BYTES, Figures, leftovers

MiB = 1 << 20
POOL = 2048 * MiB
CONTEXT = 500 * MiB  # what a process with a CUDA context holds whatever it frees


def _rank(owner: tuple[int | None, int | None], attacher: tuple[int | None, int | None]) -> list[Figures]:
    return [Figures("worker r0", 101, *owner, owner=True), Figures("transfer r0", 102, *attacher, owner=False)]


def test_a_clear_that_gave_the_pool_back_passes() -> None:
    assert leftovers(_rank((CONTEXT + POOL, CONTEXT), (CONTEXT, CONTEXT)), POOL) == []
    # a little left (rounding), and an attacher whose import NVML charged to it too
    assert leftovers(_rank((CONTEXT + POOL, CONTEXT + TOLERANCE_BYTES // 2), (CONTEXT + POOL, CONTEXT)), POOL) == []


def test_an_owner_whose_pool_is_still_held_is_named_with_its_figures() -> None:
    # torch's IPC limbo did exactly this: the owner dropped its tensor, NVML saw nothing released
    (only,) = leftovers(_rank((CONTEXT + POOL, CONTEXT + POOL), (CONTEXT, CONTEXT)), POOL)
    assert only.startswith("worker r0 (pid 101) freed its 2 GiB pool, but NVML shows it released only 0 B")
    assert "2.5 GiB -> 2.5 GiB" in only


def test_a_process_holding_more_after_the_clear_than_before_is_named() -> None:
    (only,) = leftovers(_rank((CONTEXT + POOL, CONTEXT), (CONTEXT, CONTEXT + 300 * MiB)), POOL)
    assert only.startswith("transfer r0 (pid 102) holds 300 MiB more GPU memory after the clear than before it")


def test_figures_nvml_does_not_have_are_not_judged() -> None:
    # None: withheld; 0: the pid is listed nowhere (another pid namespace), for the owner as for the others
    assert leftovers(_rank((None, None), (CONTEXT, None)), POOL) == []
    assert leftovers(_rank((0, 0), (0, 0)), POOL) == []


def test_a_pool_smaller_than_the_tolerance_can_still_be_found_held() -> None:
    small = 64 * MiB
    (only,) = leftovers(_rank((CONTEXT + small, CONTEXT + small), (CONTEXT, CONTEXT)), small)
    assert only.startswith("worker r0 (pid 101) freed its 64 MiB pool, but NVML shows it released only 0 B")
    assert leftovers(_rank((CONTEXT + small, CONTEXT + 2 * MiB), (CONTEXT, CONTEXT)), small) == []
