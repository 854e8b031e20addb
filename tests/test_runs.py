"""mpkv.pool.runs.merge_runs: block id pairs merged into runs of consecutive ids (the cuda copy path's unit)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from mpkv.pool.runs import merge_runs


def _expand(runs: np.ndarray) -> list[tuple[int, int]]:
    return [(int(d) + k, int(s) + k) for d, s, n in runs for k in range(int(n))]


def _reference(dst: list[int], src: list[int]) -> list[tuple[int, int, int]]:
    # Walk the pairs in source order (stable), extending the last run while both ids advance by one.
    out: list[list[int]] = []
    for d, s in sorted(zip(dst, src, strict=True), key=lambda p: p[1]):
        if out and d == out[-1][0] + out[-1][2] and s == out[-1][1] + out[-1][2]:
            out[-1][2] += 1
        else:
            out.append([d, s, 1])
    return [tuple(r) for r in out]  # type: ignore[misc]


def test_consecutive_pairs_merge_in_source_order() -> None:
    runs = merge_runs([3, 4, 5, 10, 11, 20], [7, 8, 9, 1, 2, 4])
    assert runs.dtype == np.int64 and runs.shape == (3, 3)
    assert runs.tolist() == [[10, 1, 2], [20, 4, 1], [3, 7, 3]]


def test_pairs_listed_out_of_order_still_merge() -> None:
    assert merge_runs([12, 10, 11], [2, 0, 1]).tolist() == [[10, 0, 3]]


def test_only_one_side_advancing_breaks_the_run() -> None:
    # dst advances by one but src jumps, then src advances but dst goes backwards.
    assert merge_runs([0, 1, 5, 4], [0, 2, 3, 4]).tolist() == [[0, 0, 1], [1, 2, 1], [5, 3, 1], [4, 4, 1]]


def test_a_source_block_copied_to_two_places() -> None:
    runs = merge_runs([1, 2, 3], [5, 5, 6])
    assert sorted(_expand(runs)) == [(1, 5), (2, 5), (3, 6)]


def test_empty_input_gives_no_runs() -> None:
    runs = merge_runs([], [])
    assert runs.shape == (0, 3) and runs.dtype == np.int64
    assert merge_runs(np.array([], dtype=np.int64), np.array([], dtype=np.int32)).shape == (0, 3)


def test_a_destination_listed_twice_is_refused_by_id() -> None:
    with pytest.raises(ValueError, match="destination block 7 is listed more than once"):
        merge_runs([7, 3, 7], [0, 1, 2])


@pytest.mark.parametrize(
    ("dst", "src", "match"),
    [
        ([1, 2], [1], "1 source blocks for 2 destination blocks"),
        ([1, -2], [1, 2], "destination block id -2 is negative"),
        ([1, 2], [-1, 2], "source block id -1 is negative"),
        ([1.0, 2.0], [1, 2], "must be a 1-D sequence of integers"),
        ([[1, 2]], [[1, 2]], "must be a 1-D sequence of integers"),
    ],
)
def test_bad_input_is_refused(dst: object, src: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        merge_runs(dst, src)


def test_random_pairs_expand_back_to_the_input(rng: random.Random) -> None:
    for _ in range(200):
        n = rng.randrange(0, 60)
        # Runs of consecutive ids on both sides, shuffled, so that merging has something to find.
        dst_pool = rng.sample(range(200), n)
        dst: list[int] = []
        src: list[int] = []
        while len(dst) < n:
            k = min(rng.randrange(1, 6), n - len(dst))
            d0, s0 = rng.randrange(0, 400), rng.randrange(0, 100)
            for j in range(k):
                d = d0 + j if d0 + j not in dst and rng.random() < 0.8 else next(x for x in dst_pool if x not in dst)
                dst.append(d)
                src.append(s0 + j if rng.random() < 0.9 else rng.randrange(0, 100))
        order = list(range(n))
        rng.shuffle(order)
        dst, src = [dst[i] for i in order], [src[i] for i in order]
        assert len(set(dst)) == n
        runs = merge_runs(np.array(dst, dtype=np.int64), np.array(src, dtype=np.int64))
        assert runs.shape == (len(runs), 3) and runs.dtype == np.int64
        assert sorted(_expand(runs)) == sorted(zip(dst, src, strict=True))
        assert [tuple(r) for r in runs.tolist()] == _reference(dst, src)
        assert (runs[:, 2] > 0).all()
