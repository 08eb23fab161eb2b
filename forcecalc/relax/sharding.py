"""Splitting a screening over machines, and putting the results back in order.

A run over ``n`` structures on ``count`` machines gives machine ``index`` (0-based) the items
``index, index + count, index + 2 * count, ...`` (round robin: every shard gets a similar mix of
small and large structures, and shard sizes differ by at most one).  The split depends only on
``n``, ``index`` and ``count``, so every machine computes its share from the same input file
without talking to the others::

    mine = shard(structures, index, count)          # on machine `index`
    relaxed = relax(mine, model)
    ...
    everything = merge_shards([out_0, out_1, ...], n_items=len(structures))

On the command line a shard is written ``I/N`` with ``I`` from 1 to ``N`` (see
:func:`parse_shard`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def _check(index: int, count: int) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"shard count must be an int >= 1, got {count!r}")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        raise ValueError(f"shard index must be an int in 0..{count - 1}, got {index!r}")


def shard_indices(n_items: int, index: int, count: int) -> list[int]:
    """Input positions of the items of shard ``index`` (0-based) of ``count``."""
    _check(index, count)
    return list(range(index, n_items, count))


def shard(items: Sequence[T], index: int, count: int) -> list[T]:
    """The items of shard ``index`` (0-based) of ``count``: ``items[index::count]``.

    Args:
        items: all inputs, in the same order on every machine.
        index: this shard, ``0 <= index < count``.
        count: number of shards.

    Returns:
        The shard's items, in input order (possibly empty when ``count > len(items)``).
    """
    _check(index, count)
    return list(items[index::count])


def merge_shards(outputs: Sequence[Sequence[T]], n_items: int | None = None) -> list[T]:
    """Undo :func:`shard`: the outputs of all shards, by shard index, back in input order.

    Args:
        outputs: ``outputs[k]`` is the list produced from ``shard(items, k, len(outputs))``,
            one result per item, in that shard's order.
        n_items: the number of input items, if known: then a missing trailing shard is
            detected too (without it, shards ``0..k`` of a larger split look like a complete
            split in ``k + 1``).

    Returns:
        The results in the order of the original items.

    Raises:
        ValueError: the shard lengths cannot come from one round-robin split of ``n_items``
            (a shard is missing or incomplete).
    """
    count = len(outputs)
    total = sum(len(out) for out in outputs)
    if n_items is not None and total != n_items:
        raise ValueError(
            f"the {count} shard(s) hold {total} results for {n_items} items: a shard is "
            "missing or incomplete"
        )
    for k, out in enumerate(outputs):
        expected = len(range(k, total, count))
        if len(out) != expected:
            raise ValueError(
                f"shard {k} of {count} has {len(out)} results, but a round-robin split of "
                f"{total} items gives it {expected}: a shard is missing or incomplete"
            )
    return [outputs[position % count][position // count] for position in range(total)]


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` (``1 <= I <= N``, as the CLI's ``--shard``) → ``(index, count)``, 0-based.

    Raises:
        ValueError: not of the form ``I/N`` or ``I`` out of range (``0/N`` is refused: shards
            are numbered from 1 on the command line).
    """
    parts = str(text).strip().split("/")
    try:
        number, count = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"a shard is written I/N (e.g. 2/8), got {text!r}") from None
    if count < 1 or not 1 <= number <= count:
        raise ValueError(f"shard {text!r}: need 1 <= I <= N (shards are numbered from 1)")
    return number - 1, count
