"""Splitting an input set over machines and merging the outputs back (forcecalc.relax.sharding)."""

from __future__ import annotations

import pytest
from relax_helpers import single_thread

from forcecalc.relax import (
    merge_shards,
    parse_shard,
    shard,
    shard_indices,
)

__all__ = ["single_thread"]


def test_shard_and_merge_round_trip():
    """Contract: shards are a deterministic round-robin split (sizes differ by at most one,
    every item in exactly one shard) and merge_shards restores the input order."""
    items = list(range(23))
    for count in (1, 2, 5, 23, 30):
        parts = [shard(items, k, count) for k in range(count)]
        assert sorted(x for p in parts for x in p) == items
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1
        assert parts == [shard(items, k, count) for k in range(count)]
        assert parts == [[items[i] for i in shard_indices(23, k, count)] for k in range(count)]
        assert merge_shards(parts) == items
        assert merge_shards([[f"r{x}" for x in p] for p in parts]) == [f"r{x}" for x in items]


def test_merge_refuses_missing_or_incomplete_shards():
    """Contract: merging a truncated shard, or (given n_items) with a shard missing, raises
    ValueError instead of silently misplacing results."""
    parts = [shard(list(range(10)), k, 3) for k in range(3)]
    assert merge_shards(parts, n_items=10) == list(range(10))
    with pytest.raises(ValueError, match="missing"):
        merge_shards(parts[:2], n_items=10)
    with pytest.raises(ValueError, match="shard 0"):
        merge_shards([parts[0], parts[1][:-1], parts[2]])
    with pytest.raises(ValueError, match="missing"):
        merge_shards([parts[0], parts[1], parts[2][:-1]], n_items=10)
    assert merge_shards([]) == []


def test_parse_shard_and_bad_indices():
    """Contract: the CLI form I/N is 1-based (1/4 .. 4/4 → index 0..3); malformed or out of
    range shards and bad index/count arguments raise ValueError."""
    assert parse_shard("1/4") == (0, 4)
    assert parse_shard(" 4/4 ") == (3, 4)
    for bad in ("0/4", "5/4", "1/0", "2", "a/b", "1/2/3"):
        with pytest.raises(ValueError):
            parse_shard(bad)
    with pytest.raises(ValueError):
        shard([1, 2], 2, 2)
    with pytest.raises(ValueError):
        shard([1, 2], 0, 0)
