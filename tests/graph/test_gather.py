"""RowIndex gathers: the same values and gradients (first and second order) as plain indexing."""

from __future__ import annotations

import pytest
import torch
from devices import CUDA, DEVICES

from forcecalc.graph.gather import RowIndex, take_rows


def _case(seed: int, n_rows: int = 7, shape: tuple[int, ...] = (5, 4)):
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(0, n_rows + 1, shape, generator=generator)  # n_rows = padding
    values = torch.randn(n_rows, 3, 2, dtype=torch.float64, generator=generator)
    return index, values.requires_grad_(True)


def _reference(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.cat([values, values.new_zeros(1, *values.shape[1:])])[index]


@pytest.mark.parametrize("seed", range(4))
def test_gather_equals_indexing_with_padding(seed):
    """Forward: ``values[index]`` with zero rows where the index is the padding value."""
    index, values = _case(seed)
    out = RowIndex(index, len(values)).gather(values)
    assert torch.equal(out, _reference(values, index))
    assert out[index == len(values)].abs().max() == 0


@pytest.mark.parametrize("seed", range(4))
def test_first_and_second_derivatives_match_indexing(seed):
    """The gradient (a gather through the inverse table) and the gradient of the gradient equal
    those of advanced indexing, for a nonlinear function of the gathered rows."""
    index, values = _case(seed)

    def loss(gathered: torch.Tensor) -> torch.Tensor:
        return (gathered.sin() * gathered.sum(dim=-1, keepdim=True) ** 2).sum()

    ours = torch.autograd.grad(loss(RowIndex(index, 7).gather(values)), values, create_graph=True)
    ref = torch.autograd.grad(loss(_reference(values, index)), values, create_graph=True)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-12, atol=1e-12)
    direction = torch.randn_like(values)
    second = torch.autograd.grad((ours[0] * direction).sum(), values)[0]
    second_ref = torch.autograd.grad((ref[0] * direction).sum(), values)[0]
    torch.testing.assert_close(second, second_ref, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda v: RowIndex(index, 7).gather(v), (values,), check_grad_dtypes=True
    )
    assert torch.autograd.gradgradcheck(lambda v: RowIndex(index, 7).gather(v).sin(), (values,))


def test_inverse_lists_every_reader_once_in_order():
    """``inverse`` holds, for each row, the flat positions that read it (increasing, padded),
    so the gradient's sum runs in a fixed order: deterministic on every device."""
    index = torch.tensor([[2, 0, 3], [0, 2, 2]])  # 3 = padding
    transposed = RowIndex(index, 3).transposed()
    assert transposed.index.tolist() == [[1, 3, 6], [6, 6, 6], [0, 4, 5]]
    assert transposed.gather(torch.arange(6.0).view(6, 1)).sum(1).view(-1).tolist() == [4, 0, 9]


@pytest.mark.parametrize("sorted_index", [True, False])
def test_tables_of_sorted_and_unsorted_indexes(sorted_index):
    """An index already in order (edges by target, atoms by system: no sort is needed) and a
    shuffled one get consistent tables: every reader listed once, in increasing position,
    and ``position`` pointing back at it; padding entries point nowhere."""
    generator = torch.Generator().manual_seed(1)
    index = torch.randint(0, 6, (40,), generator=generator)  # 5 rows + padding value 5
    index = index.sort().values if sorted_index else index
    rows = RowIndex(index, 5)
    inverse, position = rows.inverse, rows.position
    for row in range(5):
        readers = inverse[row][inverse[row] < 40]
        assert readers.tolist() == torch.nonzero(index == row).flatten().tolist()
    flat = inverse.reshape(-1)
    live = index < 5
    assert torch.equal(flat[position[live]], torch.nonzero(live).flatten())
    assert bool((position[~live] == inverse.numel()).all())


def test_empty_index_and_wrong_row_count():
    """An empty index gathers an empty tensor whose gradient is zero everywhere; values with
    another row count than the index was built for are refused by name."""
    values = torch.randn(4, 2, requires_grad=True)
    out = RowIndex(torch.zeros(0, 3, dtype=torch.int64), 4).gather(values)
    assert out.shape == (0, 3, 2)
    out.sum().backward()
    assert torch.equal(values.grad, torch.zeros(4, 2))
    with pytest.raises(ValueError, match="expected 5 rows"):
        RowIndex(torch.zeros(2, dtype=torch.int64), 5).gather(values)


@pytest.mark.parametrize("seed", range(3))
def test_sum_by_row_equals_index_add(seed):
    """``sum_by_row`` (and the gather path it takes on CUDA) is ``index_add``: row sums over the
    entries with each index, with the same gradient."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(0, 6, (40,), generator=generator)
    values = torch.randn(40, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    expected = torch.zeros(6, 3, dtype=torch.float64).index_add_(0, index, values)
    gathered = RowIndex(index, 6).transposed().gather(values).sum(dim=1)
    torch.testing.assert_close(
        RowIndex(index, 6).sum_by_row(values), expected, rtol=1e-14, atol=1e-14
    )
    torch.testing.assert_close(gathered, expected, rtol=1e-14, atol=1e-14)
    weights = torch.randn(6, 3, dtype=torch.float64)
    grad = torch.autograd.grad((gathered * weights).sum(), values)[0]
    torch.testing.assert_close(grad, weights[index], rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(11,), (5, 4), (0,)])
def test_take_rows_is_advanced_indexing_with_its_gradients(shape):
    """``take_rows(values, index)`` is ``values[index]`` for an index of any shape (repeats
    and empty included), with the same first and second derivatives."""
    generator = torch.Generator().manual_seed(1)
    index = torch.randint(0, 7, shape, generator=generator)
    values = torch.randn(7, 3, 2, dtype=torch.float64, generator=generator).requires_grad_(True)
    assert torch.equal(take_rows(values, index), values[index])

    def loss(gathered: torch.Tensor) -> torch.Tensor:
        return (gathered.sin() * gathered.sum(dim=-1, keepdim=True) ** 2).sum()

    ours = torch.autograd.grad(loss(take_rows(values, index)), values, create_graph=True)[0]
    ref = torch.autograd.grad(loss(values[index]), values, create_graph=True)[0]
    torch.testing.assert_close(ours, ref, rtol=1e-14, atol=1e-14)
    direction = torch.randn_like(values)
    second = torch.autograd.grad((ours * direction).sum(), values)[0]
    second_ref = torch.autograd.grad((ref * direction).sum(), values)[0]
    torch.testing.assert_close(second, second_ref, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda v: take_rows(v, index), (values,))


@CUDA
def test_cuda_sums_are_bitwise_repeatable():
    """On CUDA, where ``index_add_`` uses atomics, ``sum_by_row`` gives the same bits every
    call."""
    generator = torch.Generator().manual_seed(0)
    index = torch.randint(0, 50, (200_000,), generator=generator).cuda()
    values = torch.randn(200_000, 8, generator=generator).cuda()
    first = RowIndex(index, 50).sum_by_row(values)
    assert all(torch.equal(first, RowIndex(index, 50).sum_by_row(values)) for _ in range(5))


@pytest.mark.parametrize("device", DEVICES)
def test_take_rows_gradient_is_bitwise_repeatable(device):
    """The gradient of ``take_rows`` (a sum over the positions that read each row) gives the
    same bits on every call, with two threads on the CPU (where ``index_put_``'s parallel
    accumulation did not: a training run and its ``--resume`` drifted apart by 1e-8)."""
    torch.set_num_threads(2)  # the graph tests' fixture restores the count afterwards
    generator = torch.Generator().manual_seed(0)
    index = torch.randint(0, 1000, (50_000,), generator=generator).to(device)
    values = torch.randn(1000, 64, generator=generator).to(device).requires_grad_(True)
    weights = torch.randn(50_000, 64, generator=generator).to(device)

    def gradient() -> torch.Tensor:
        return torch.autograd.grad((take_rows(values, index) * weights).sum(), values)[0]

    first = gradient()
    with torch.no_grad():
        torch.testing.assert_close(first, torch.zeros_like(values).index_add_(0, index, weights))
    assert all(torch.equal(first, gradient()) for _ in range(5))
