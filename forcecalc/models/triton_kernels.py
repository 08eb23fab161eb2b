"""Fused Triton kernels for SpinConv's inference forward (opt-in, float32, no autograd).

SpinConv-All, batched on a GPU, is bound by memory traffic when each PyTorch operator is its
own kernel (``benchmarks/README.md``, "Where the GPU targets stand"): the mixtures of
experts write and read back their ``[n, 8 x mid]`` expert outputs, and the spin convolutions
their splat weights ``[n, width, long x lat]``, packed spectra (twice: built, then permuted)
and the products of every frequency.  These kernels compute the same numbers without those tensors:

* :func:`mixture_of_experts`: ``sum_k w_k * act(h @ W_k^T + b_k)``, the experts' products
  accumulated tile by tile, each expert's tile activated, weighted and added in registers
  (``[n, mid]`` written once);
* :func:`linear`: the mixtures' input and output layers and the distance features' layers,
  the residual sum and Swish folded in where they follow; :func:`basis_linear` the distance
  block's Gaussian basis and its layer;
* :func:`splat_directions`: where each grid's values land on it, from the frames and the
  directions (float64, the projection and the grid positions around ``atan2`` and ``asin``);
* :func:`spin_spectra`: the packed longitude spectra of the projected grids straight from
  the splat factors (:func:`~forcecalc.models.spinconv.splat_factors`: each value's grid
  column and row and how far between, its bilinear weights made in registers) and the
  gathered messages, written in the frequency-major layout the products read;
* :func:`spin_pool`: the kernels' products at every frequency (one real product per pair of
  packed entries, see :func:`paired_kernels`), then the inverse DFT (a 16 x 16 product per
  output), the bias, Swish, the mean over the longitude and the GroupNorm that follows in one
  pass (``[n, mid]`` written once).  Two kernels, not one: an accumulator for
  every longitudinal shift in the products' kernel took all 255 registers of a thread
  (spilling, one program per multiprocessor), where the products written once and read back
  cost ``[long, n, mid]`` of memory traffic; Gauss's three products per frequency, with three
  accumulators, fitted 32 x 64 tiles without spilling, the paired product 64 x 64.

Matrix products are ``tf32x3`` by default (three TF32 tensor-core products per product:
near float32's accuracy, SpinConv-All's energies 1e-4 eV and forces 2e-5 of the largest
from float64 on an H100, where full float32 gives 1e-6 and 3e-6; the weights split into
their two TF32 parts once per call, the spectra's latitude factors once for all longitudes,
rather than by Triton at every step: :data:`SPLIT_WEIGHTS`); ``"tf32"`` is one
(about 1e-3 relative error per product: Triton drops the inputs' low 13 bits) and ``"ieee"``
full float32 on CUDA cores; :func:`with_triton_kernels` also has ``"mixed"``, one TF32 product
on inputs rounded to the nearest TF32 number (the kernels' ``rounded`` option,
:func:`tf32_rounded`) where it matters least.  On a CPU tensor the kernels run in Triton's
interpreter (numpy, full float32 whatever the precision) where Triton was imported with
``TRITON_INTERPRET=1``: for tests, far slower than the PyTorch path.
:func:`with_triton_kernels` returns a copy of a model that uses them.
"""

# Triton reads a kernel argument's annotation as its type (tl.constexpr: a compile-time
# constant), so the pointers and sizes of the kernels below stay unannotated.
# ruff: noqa: ANN001

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl
from torch import Tensor, nn
from triton.runtime.interpreter import InterpretedFunction

if TYPE_CHECKING:
    from forcecalc.models.spinconv import LatitudeSplat, LongitudeSplat

#: Precisions accepted by :func:`with_triton_kernels`: a ``tl.dot`` precision for every
#: product, or ``"mixed"`` (see there).
PRECISIONS = ("tf32x3", "mixed", "tf32", "ieee")
# Tiles, warps and software-pipelining stages: the fastest of the choices timed in SpinConv-All's
# batched forward on an H100 (benchmarks/triton_tiles.py, session 20).
#: Tile sizes (rows, columns, reduction) of :func:`mixture_of_experts`.
MIXTURE_TILES = (64, 128, 32)
#: Warps and stages of :func:`mixture_of_experts` (two ``[rows, columns]`` accumulators).
MIXTURE_WARPS, MIXTURE_STAGES = 4, 3
#: Tile sizes, warps and stages of :func:`linear`.
LINEAR_TILES = (128, 64, 32)
LINEAR_WARPS, LINEAR_STAGES = 8, 3
#: Grids per program of :func:`spin_spectra`.
SPECTRA_GRIDS = 2
#: Warps and stages of :func:`spin_spectra`.
SPECTRA_WARPS, SPECTRA_STAGES = 2, 1
#: Tile sizes (grids, columns of a pair of entries, reduction) of the frequency products in
#: :func:`spin_pool`.
PRODUCTS_TILES = (128, 64, 32)
#: Warps and stages of the frequency products.
PRODUCTS_WARPS, PRODUCTS_STAGES = 4, 3
#: Output numbers per program of the inverse DFT in :func:`spin_pool` (each grid's outputs of
#: a group, a GroupNorm group, padded to a power of two; at least one group per program).
INVERSE_COLUMNS = 512
#: Whether ``tf32x3`` products split a factor that is the same for many products once: the
#: products of weights (the linear layers', the mixtures', the kernels' paired spectra) are
#: :func:`_dot_weight`'s three ``tf32`` products into the running sum, the weights read split
#: in memory (their nearest TF32 number and the TF32 number nearest the rest:
#: :func:`tf32_split`, one pass per call), and the spectra's latitude factors are split once
#: for all longitudes.  ``False``: Triton's own ``tf32x3``, which splits both factors in
#: registers at every step (a weight from shared memory and back) and sums the two small
#: products apart (a second accumulator).  Compiled for sm_90a at SpinConv-All's sizes
#: (Triton 3.6), the mixture's tile spills 284 bytes per thread Triton's way, 24 this way, and
#: its main loop holds 592 instructions against 297 (``benchmarks/kernel_registers.py``).
SPLIT_WEIGHTS = True
#: Whether :func:`spin_spectra` computes each grid's spectra as one product
#: ``[(longitude, latitude), values] @ [values, channels]`` (one program per grid; on Hopper
#: Triton gives it to ``wgmma``, the latitude-longitude factor from registers) instead of one
#: ``[channels, values] @ [values, latitude]`` product per longitude (``mma.sync``, the
#: kernel timed in session 20).  Compiled for sm_90a at SpinConv-All's sizes (Triton 3.6), the
#: one product issues 5,856 warp instructions per grid against 8,334 with ``tf32x3`` (4,096
#: against 5,243 with ``tf32``; ``kernel_registers.py``).  Timed on an H100 (session 25,
#: SpinConv-All batched, ``tf32x3``, two interleaved runs each): the spectra's device time 12.3
#: -> 10.2 ms per forward of 64 x 66 atoms, 62.2-63.0k -> 66.9-68.0k atoms/s at batch 64 and
#: 68.8-69.4k -> 70.7-70.8k at 256 (``speed_triton_tf32x3_*_cuda_h100_s25_b.json``).  Only
#: where a grid's largest factor stays small (:data:`ONE_PRODUCT_FACTOR`): it grows with
#: longitudes x latitudes x values, the other kernel's footprint with latitudes x values alone.
SPECTRA_ONE_PRODUCT = True
#: The most entries of the one-product spectra's factor (a block of longitudes x latitudes by
#: the padded values: SpinConv-All's 8 x 16 by 32 + 16 = 6,144); beyond it (e.g. 16
#: longitudes of 16 latitudes by 64 values: 144 KiB of shared memory, or spilling registers)
#: the per-longitude kernel runs.
ONE_PRODUCT_FACTOR = 8192
#: Warps of the one-product spectra (one warp group: ``wgmma``'s unit).
SPECTRA_ONE_PRODUCT_WARPS = 4
#: Entries per program and warps of the element-wise kernels (:func:`splat_directions`'s,
#: :func:`tf32_split`'s; not timed: chosen for few registers per thread by
#: ``kernel_registers.py``, 22-47: 5-8 programs of 8 warps per multiprocessor).
ELEMENTWISE_ENTRIES, ELEMENTWISE_WARPS = 512, 8


@triton.jit
def _dot_weight(
    acc, a, b_ptrs, b_ok, plane, PRECISION: tl.constexpr, SPLIT: tl.constexpr
) -> tl.tensor:
    """``acc + a @ b``, ``b`` read at ``b_ptrs`` (inside where ``b_ok``): one ``tl.dot`` at
    ``PRECISION``, or with ``SPLIT`` (:data:`SPLIT_WEIGHTS`) three ``tf32`` ones, ``b`` at
    ``b_ptrs`` being its TF32 part and ``plane`` numbers further the rest's
    (:func:`tf32_split`), ``a`` split here; the two small products first, each into the
    running sum (where the tensor cores' accumulation truncates, errors of ~1e-6 relative
    against ~1e-7 with Triton's second accumulator, emulated; on an H100 SpinConv-All's
    forces 1.2e-5 of the largest from the PyTorch path's against 2.5e-6 Triton's way, 20%
    faster: float32's tolerances are far wider).  An infinite ``a`` has no rest and gives
    +-inf, as a float32 product (Triton masks the NaN its ``tf32x3`` makes); an infinite weight
    gives NaN (Triton's: +-inf)."""
    b = tl.load(b_ptrs, mask=b_ok, other=0.0)
    if SPLIT:
        a_high = _tf32_nearest(a)  # a NaN's rest is NaN
        a_low = tl.where(a_high == a, 0.0, a - a_high)  # exact; none for an infinite a
        acc = tl.dot(a_low, b, acc, input_precision="tf32")
        b_low = tl.load(b_ptrs + plane, mask=b_ok, other=0.0)
        a_finite = tl.where(tl.abs(a_high) == float("inf"), 0.0, a_high)
        acc = tl.dot(a_finite, b_low, acc, input_precision="tf32")
        return tl.dot(a_high, b, acc, input_precision="tf32")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _tf32_nearest(x) -> tl.tensor:
    """:func:`_tf32_rounded` without its NaN guard (a NaN may come out infinite or zero): for
    a product's split, where the NaN's rest, ``x`` less this, is NaN and reaches the sum."""
    return ((x.to(tl.int32, bitcast=True) + 0x1000) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def _rows_times_weight(
    acc,
    x_ptr,
    weight_ptr,
    rows,
    row_ok,
    outputs,
    output_ok,
    n_in,
    plane,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    SPLIT: tl.constexpr,
) -> tl.tensor:
    """``acc`` plus ``x[rows] @ weight[outputs].T``: rows of ``x`` ``[*, n_in]`` times rows of
    ``weight`` ``[*, n_in]`` (an ``nn.Linear`` weight, read as its transpose; split with
    ``SPLIT``, :func:`_dot_weight`)."""
    for start in range(0, n_in, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_ok = ks < n_in
        a = tl.load(
            x_ptr + rows[:, None] * n_in + ks[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        b_ptrs = weight_ptr + outputs[None, :] * n_in + ks[:, None]
        acc = _dot_weight(
            acc, a, b_ptrs, k_ok[:, None] & output_ok[None, :], plane, PRECISION, SPLIT
        )
    return acc


@triton.jit
def _output_tile(
    n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
) -> tuple[tl.tensor, tl.tensor, tl.tensor, tl.tensor]:
    """This program's tile of a row-major ``[n_rows, n_cols]`` output: its row and column
    indices (``[BLOCK_M]``, ``[BLOCK_N]``; rows in int64) and which of them are inside."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, cols, rows < n_rows, cols < n_cols


@triton.jit
def _store_tile(out_ptr, values, rows, cols, row_ok, col_ok, n_cols) -> None:
    """Store ``values`` ``[BLOCK_M, BLOCK_N]`` at ``rows`` x ``cols`` of the row-major output
    ``[*, n_cols]`` (the tile of :func:`_output_tile`), inside it only."""
    tl.store(
        out_ptr + rows[:, None] * n_cols + cols[None, :],
        values,
        mask=row_ok[:, None] & col_ok[None, :],
    )


@triton.jit
def _tf32_rounded(x) -> tl.tensor:
    """``x`` (float32) rounded to the nearest TF32 number (10 mantissa bits, ties away from
    zero, NaN kept, as ``cvt.rna.tf32.f32``): a ``tl.dot`` in ``tf32``, which drops the low 13
    bits of its inputs, then multiplies exactly what it is given."""
    return tl.where(x == x, _tf32_nearest(x), x)


@triton.jit
def _split_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr) -> None:
    # out [2, n]: x's nearest TF32 number, then the TF32 number nearest the rest
    at = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = at < n
    x = tl.load(x_ptr + at, mask=inside, other=0.0)
    high = _tf32_rounded(x)
    tl.store(out_ptr + at, high, mask=inside)
    low = tl.where(high == x, 0.0, _tf32_rounded(x - high))
    tl.store(out_ptr + tl.cast(n, tl.int64) + at, low, mask=inside)


@triton.jit
def _mixture_kernel(
    h_ptr,
    weight_ptr,
    bias_ptr,
    mixture_ptr,
    out_ptr,
    n_rows,
    n_in,
    n_mid,
    n_experts,
    plane,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    SPLIT: tl.constexpr,
) -> None:
    rows, cols, row_ok, col_ok = _output_tile(n_rows, n_mid, BLOCK_M, BLOCK_N)
    out = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for expert in range(n_experts):
        # weight is fc2's [n_experts * n_mid, n_in]; this expert's rows of it
        outputs = expert * n_mid + cols
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc = _rows_times_weight(
            acc, h_ptr, weight_ptr, rows, row_ok, outputs, col_ok, n_in, plane, BLOCK_K,
            PRECISION, SPLIT,
        )  # fmt: skip
        acc += tl.load(bias_ptr + outputs, mask=col_ok, other=0.0)[None, :]
        share = tl.load(mixture_ptr + rows * n_experts + expert, mask=row_ok, other=0.0)
        out += share[:, None] * (acc * tl.sigmoid(acc))
    _store_tile(out_ptr, out, rows, cols, row_ok, col_ok, n_mid)


@triton.jit
def _linear_kernel(
    x_ptr,
    weight_ptr,
    bias_ptr,
    addend_ptr,
    out_ptr,
    n_rows,
    n_in,
    n_out,
    plane,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ADD: tl.constexpr,
    SWISH: tl.constexpr,
    ROUND: tl.constexpr,
    PRECISION: tl.constexpr,
    SPLIT: tl.constexpr,
) -> None:
    rows, cols, row_ok, col_ok = _output_tile(n_rows, n_out, BLOCK_M, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = _rows_times_weight(
        acc, x_ptr, weight_ptr, rows, row_ok, cols, col_ok, n_in, plane, BLOCK_K, PRECISION, SPLIT
    )
    acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0)[None, :]
    if ADD:
        acc += tl.load(
            addend_ptr + rows[:, None] * n_out + cols[None, :],
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
    if SWISH:
        acc = acc * tl.sigmoid(acc)
    if ROUND:
        acc = _tf32_rounded(acc)
    _store_tile(out_ptr, acc, rows, cols, row_ok, col_ok, n_out)


@triton.jit
def _basis_linear_kernel(
    distance_ptr,
    offset_ptr,
    weight_ptr,
    bias_ptr,
    out_ptr,
    n_rows,
    n_basis,
    n_out,
    coeff,
    plane,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    SPLIT: tl.constexpr,
) -> None:
    rows, cols, row_ok, col_ok = _output_tile(n_rows, n_out, BLOCK_M, BLOCK_N)
    distance = tl.load(distance_ptr + rows, mask=row_ok, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, n_basis, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_ok = ks < n_basis
        # the Gaussians [BLOCK_M, BLOCK_K] of the rows' distances, zero outside
        diff = distance[:, None] - tl.load(offset_ptr + ks, mask=k_ok, other=0.0)[None, :]
        basis = tl.where(row_ok[:, None] & k_ok[None, :], tl.exp(coeff * (diff * diff)), 0.0)
        b_ptrs = weight_ptr + cols[None, :] * n_basis + ks[:, None]
        acc = _dot_weight(
            acc, basis, b_ptrs, k_ok[:, None] & col_ok[None, :], plane, PRECISION, SPLIT
        )
    acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0)[None, :]
    _store_tile(out_ptr, acc, rows, cols, row_ok, col_ok, n_out)


@triton.jit
def _directions_kernel(
    frames_ptr,
    unit_ptr,
    index_ptr,
    out_ptr,
    n_entries,
    width,
    n_values,
    POLE_EPS2: tl.constexpr,
    BLOCK: tl.constexpr,
) -> None:
    # entry e = (row, slot) of the [n, width] index: the direction p = frames[row] @
    # unit[index[e]] (zero for padding), written as the arguments of atan2 and asin
    entries = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = entries < n_entries
    plane = tl.cast(n_entries, tl.int64)  # an int argument of 1 is a constant: tl.cast
    row = entries // width
    reader = tl.load(index_ptr + entries, mask=inside, other=n_values)
    read = inside & (reader < n_values)
    x = tl.load(unit_ptr + reader * 3, mask=read, other=0.0)
    y = tl.load(unit_ptr + reader * 3 + 1, mask=read, other=0.0)
    z = tl.load(unit_ptr + reader * 3 + 2, mask=read, other=0.0)
    frame = frames_ptr + row * 9
    p0 = tl.load(frame, mask=inside) * x + tl.load(frame + 1, mask=inside) * y
    p0 += tl.load(frame + 2, mask=inside) * z
    p1 = tl.load(frame + 3, mask=inside) * x + tl.load(frame + 4, mask=inside) * y
    p1 += tl.load(frame + 5, mask=inside) * z
    p2 = tl.load(frame + 6, mask=inside) * x + tl.load(frame + 7, mask=inside) * y
    p2 += tl.load(frame + 8, mask=inside) * z
    # on the pole longitude atan2(+0, +1) = 0 and latitude asin(+-1) (splat_factors's
    # convention); float64 constants made as such (Triton's interpreter makes a bare float
    # literal a float32)
    pole = p1 * p1 + p2 * p2 < tl.full([], POLE_EPS2, tl.float64)
    one = tl.full([], 1.0, tl.float64)
    tl.store(out_ptr + entries, tl.where(pole, 0.0, p1), mask=inside)
    tl.store(out_ptr + plane + entries, tl.where(pole, one, p2), mask=inside)
    sine = tl.where(pole, tl.where(p0 > 0, one, -one), tl.minimum(tl.maximum(p0, -one), one))
    tl.store(out_ptr + 2 * plane + entries, sine, mask=inside)


@triton.jit
def _bins_kernel(
    angles_ptr,
    index_ptr,
    column_ptr,
    fraction_ptr,
    row_ptr,
    rise_ptr,
    n_entries,
    n_values,
    long,
    lat,
    BLOCK: tl.constexpr,
) -> None:
    # splat_factors's grid position of each (longitude, latitude), its formulas
    entries = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = entries < n_entries
    longitude = tl.load(angles_ptr + entries, mask=inside, other=0.0)
    latitude = tl.load(
        angles_ptr + 2 * tl.cast(n_entries, tl.int64) + entries, mask=inside, other=0.0
    )
    pi = tl.full([], 3.141592653589793, tl.float64)
    col = (longitude + pi) / tl.full([], 6.283185307179586, tl.float64) * tl.cast(long, tl.float64)
    row = (latitude + tl.full([], 1.5707963267948966, tl.float64)) / pi
    row = tl.full([], 0.99, tl.float64) * row + tl.full([], 0.005, tl.float64)
    row = row * (tl.cast(lat, tl.float64) - tl.full([], 1.0, tl.float64))
    col_floor, row_floor = tl.floor(col), tl.floor(row)
    valid = tl.load(index_ptr + entries, mask=inside, other=n_values) < n_values
    tl.store(fraction_ptr + entries, (col - col_floor).to(tl.float32), mask=inside)
    tl.store(
        rise_ptr + entries, tl.where(valid, (row - row_floor).to(tl.float32), 0.0), mask=inside
    )
    tl.store(column_ptr + entries, col_floor.to(tl.int64) % long, mask=inside)
    tl.store(row_ptr + entries, row_floor.to(tl.int64) % lat, mask=inside)


@triton.jit
def _grid_slots(
    values_ptr,
    index_ptr,
    column_ptr,
    fraction_ptr,
    row_ptr,
    rise_ptr,
    weight_ptr,
    grids,
    grid_ok,
    first,
    n_values,
    width,
    channels,
    long,
    lat,
    SLOTS: tl.constexpr,
    CHANNELS: tl.constexpr,
    LAT: tl.constexpr,
    WEIGHTED: tl.constexpr,
) -> tuple[tl.tensor, tl.tensor, tl.tensor, tl.tensor, tl.tensor, tl.tensor]:
    """Slots ``first`` to ``first + SLOTS`` of the ``grids``: what the grids read there
    ``[GRIDS, CHANNELS, SLOTS]``, the latitude factors ``[GRIDS, SLOTS, LAT]``, the longitude
    factors (the table rows before and after, the fraction between them: ``[GRIDS, SLOTS]``)
    and which slots are inside."""
    slots = first + tl.arange(0, SLOTS)
    channel = tl.arange(0, CHANNELS)
    latitude = tl.arange(0, LAT)
    slot_ok = grid_ok[:, None] & (slots < width)[None, :]
    entry = grids[:, None] * width + slots[None, :]
    reader = tl.load(index_ptr + entry, mask=slot_ok, other=n_values)
    read = slot_ok & (reader < n_values)
    # the messages the grid reads, zero for padding
    features = tl.load(
        values_ptr + reader.to(tl.int64)[:, None, :] * channels + channel[None, :, None],
        mask=read[:, None, :] & (channel < channels)[None, :, None],
        other=0.0,
    )
    # the bilinear weights of the rows below and above (LatitudeSplat.rows, except where the
    # grid reads padding: zero features there)
    below = tl.load(row_ptr + entry, mask=slot_ok, other=0)
    above = tl.where(below + 1 == lat, 0, below + 1)
    rise = tl.load(rise_ptr + entry, mask=slot_ok, other=0.0)
    lower = 1.0 - rise
    rows = tl.where(latitude[None, None, :] == below[:, :, None], lower[:, :, None], 0.0)
    rows += tl.where(latitude[None, None, :] == above[:, :, None], rise[:, :, None], 0.0)
    if WEIGHTED:
        rows = rows * tl.load(weight_ptr + entry, mask=slot_ok, other=0.0)[:, :, None]
    # the table rows (the columns' packed DFTs) to interpolate
    before = tl.load(column_ptr + entry, mask=slot_ok, other=0) * long
    after = tl.where(before + long == long * long, 0, before + long)
    fraction = tl.load(fraction_ptr + entry, mask=slot_ok, other=0.0)
    return features, rows, before, after, fraction, slot_ok


@triton.jit
def _lerp(start, end, fraction) -> tl.tensor:
    """``start + fraction * (end - start)`` as torch.lerp computes it (its two-sided
    formula, exact at both ends): a column DFT's entry interpolated between two columns."""
    return tl.where(
        fraction < 0.5, start + fraction * (end - start), end - (end - start) * (1.0 - fraction)
    )


@triton.jit
def _phased(table_ptr, k, features, before, after, fraction, slot_ok) -> tl.tensor:
    """The values of :func:`_grid_slots`'s slots times the interpolated ``k``-th entry of
    their column's DFT: the first factor of their spectra's entry ``k``."""
    start = tl.load(table_ptr + before + k, mask=slot_ok, other=0.0)
    end = tl.load(table_ptr + after + k, mask=slot_ok, other=0.0)
    return features * _lerp(start, end, fraction)[:, None, :]


@triton.jit
def _tf32_parts(x) -> tuple[tl.tensor, tl.tensor]:
    """``x``'s nearest TF32 number and the rest (exact: their sum is ``x``; an infinite or
    NaN ``x`` has a NaN rest): a spectra product's pre-split second factor."""
    low = x - _tf32_nearest(x)
    return x - low, low


@triton.jit
def _spectrum_dot(acc, a, b, b_low, PRECISION: tl.constexpr, SPLIT: tl.constexpr) -> tl.tensor:
    """``acc + a @ b`` at ``PRECISION``; with ``SPLIT``, ``acc + a @ (b + b_low)`` (``b`` TF32
    numbers, ``b_low`` the rest: :func:`_tf32_parts`) as three ``tf32`` products, the two
    small ones first; ``a``'s rest unguarded, so that an infinite or NaN ``a`` (or second
    factor: its rest is NaN) makes NaN, as the PyTorch path (infinity times the latitude
    factors' zeros) and any NaN whose TF32 part rounds to a number."""
    if SPLIT:
        a_high = _tf32_nearest(a)
        acc = tl.dot(a - a_high, b, acc, input_precision="tf32")
        acc = tl.dot(a_high, b_low, acc, input_precision="tf32")
        return tl.dot(a_high, b, acc, input_precision="tf32")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _spectra_kernel(
    values_ptr,
    index_ptr,
    column_ptr,
    fraction_ptr,
    table_ptr,
    row_ptr,
    rise_ptr,
    weight_ptr,
    out_ptr,
    n_grids,
    n_values,
    width,
    channels,
    per_group,
    long,
    lat,
    GRIDS: tl.constexpr,
    WIDTH: tl.constexpr,
    REST: tl.constexpr,
    CHANNELS: tl.constexpr,
    LAT: tl.constexpr,
    WEIGHTED: tl.constexpr,
    ROUND: tl.constexpr,
    PRECISION: tl.constexpr,
    SPLIT: tl.constexpr,
) -> None:
    # a grid's slots in one chunk of WIDTH, or two (WIDTH, then REST; tl.dot's reduction is
    # a power of two: 40 slots as 32 + 16, not 64).  SPLIT (tf32x3, SPLIT_WEIGHTS): the
    # latitude factors split into TF32 parts once for every k (Triton's tf32x3 splits both
    # factors at every k), each product three tf32 ones (_spectrum_dot)
    grids = tl.program_id(0).to(tl.int64) * GRIDS + tl.arange(0, GRIDS)
    channel = tl.arange(0, CHANNELS)
    latitude = tl.arange(0, LAT)
    grid_ok = grids < n_grids
    features, rows, before, after, fraction, slot_ok = _grid_slots(
        values_ptr, index_ptr, column_ptr, fraction_ptr, row_ptr, rise_ptr, weight_ptr, grids,
        grid_ok, 0, n_values, width, channels, long, lat, WIDTH, CHANNELS, LAT, WEIGHTED,
    )  # fmt: skip
    rows_low = rows
    if SPLIT:  # finite: fractions and envelope weights
        rows, rows_low = _tf32_parts(rows)
    if REST:
        features_2, rows_2, before_2, after_2, fraction_2, slot_ok_2 = _grid_slots(
            values_ptr, index_ptr, column_ptr, fraction_ptr, row_ptr, rise_ptr, weight_ptr,
            grids, grid_ok, WIDTH, n_values, width, channels, long, lat, REST, CHANNELS, LAT,
            WEIGHTED,
        )  # fmt: skip
        rows_low_2 = rows_2
        if SPLIT:
            rows_2, rows_low_2 = _tf32_parts(rows_2)
    group = channel // per_group
    column = (channel % per_group) * lat
    n_groups = channels // per_group
    store_ok = grid_ok[:, None, None] & (channel < channels)[None, :, None]
    store_ok = store_ok & (latitude < lat)[None, None, :]
    for k in range(long):
        spectrum = tl.zeros([GRIDS, CHANNELS, LAT], dtype=tl.float32)
        a = _phased(table_ptr, k, features, before, after, fraction, slot_ok)
        if REST:
            a_2 = _phased(table_ptr, k, features_2, before_2, after_2, fraction_2, slot_ok_2)
        spectrum = _spectrum_dot(spectrum, a, rows, rows_low, PRECISION, SPLIT)
        if REST:
            spectrum = _spectrum_dot(spectrum, a_2, rows_2, rows_low_2, PRECISION, SPLIT)
        if ROUND:
            spectrum = _tf32_rounded(spectrum)
        # out [long, groups, n_grids, per_group * lat]
        plane = (k * n_groups + group).to(tl.int64)[None, :, None] * n_grids + grids[:, None, None]
        offset = plane * (per_group * lat) + column[None, :, None] + latitude[None, None, :]
        tl.store(out_ptr + offset, spectrum, mask=store_ok)


@triton.jit
def _grid_values(
    values_ptr,
    index_ptr,
    column_ptr,
    fraction_ptr,
    row_ptr,
    rise_ptr,
    weight_ptr,
    grid,
    first,
    n_values,
    width,
    channels,
    long,
    lat,
    SLOTS: tl.constexpr,
    CHANNELS: tl.constexpr,
    LAT: tl.constexpr,
    WEIGHTED: tl.constexpr,
) -> tuple[tl.tensor, tl.tensor, tl.tensor, tl.tensor, tl.tensor, tl.tensor]:
    """:func:`_grid_slots` of one grid, transposed for :func:`_spectra_product_kernel`: the
    values it reads ``[SLOTS, CHANNELS]``, the latitude factors ``[LAT, SLOTS]``, the
    longitude's table rows and fraction ``[SLOTS]`` and which slots are inside."""
    grids = grid + tl.arange(0, 1)
    features, rows, before, after, fraction, slot_ok = _grid_slots(
        values_ptr, index_ptr, column_ptr, fraction_ptr, row_ptr, rise_ptr, weight_ptr, grids,
        grids < grid + 1, first, n_values, width, channels, long, lat, SLOTS, CHANNELS, LAT,
        WEIGHTED,
    )  # fmt: skip
    return (
        tl.trans(tl.reshape(features, (CHANNELS, SLOTS))),
        tl.trans(tl.reshape(rows, (SLOTS, LAT))),
        tl.reshape(before, (SLOTS,)),
        tl.reshape(after, (SLOTS,)),
        tl.reshape(fraction, (SLOTS,)),
        tl.reshape(slot_ok, (SLOTS,)),
    )


@triton.jit
def _longitude_factors(
    table_ptr,
    first,
    long,
    rows,
    before,
    after,
    fraction,
    slot_ok,
    KB: tl.constexpr,
    LAT: tl.constexpr,
    SLOTS: tl.constexpr,
) -> tl.tensor:
    """``[KB * LAT, SLOTS]``: entry ``first + k`` of each slot's interpolated column DFT
    times its latitude factors, row ``k * LAT + y`` (zero past ``long``)."""
    k = first + tl.arange(0, KB)
    ok = slot_ok[None, :] & (k < long)[:, None]
    start = tl.load(table_ptr + before[None, :] + k[:, None], mask=ok, other=0.0)
    end = tl.load(table_ptr + after[None, :] + k[:, None], mask=ok, other=0.0)
    phase = _lerp(start, end, fraction[None, :])
    return tl.reshape(phase[:, None, :] * rows[None, :, :], (KB * LAT, SLOTS))


@triton.jit
def _spectra_block(
    table_ptr,
    out_ptr,
    grid,
    first,
    n_grids,
    long,
    lat,
    channels,
    rows,
    before,
    after,
    fraction,
    slot_ok,
    features,
    features_low,
    rows_2,
    before_2,
    after_2,
    fraction_2,
    slot_ok_2,
    features_2,
    features_low_2,
    KB: tl.constexpr,
    LAT: tl.constexpr,
    WIDTH: tl.constexpr,
    REST: tl.constexpr,
    CHANNELS: tl.constexpr,
    PER_GROUP: tl.constexpr,
    ROUND: tl.constexpr,
    PRECISION: tl.constexpr,
    SPLIT: tl.constexpr,
) -> None:
    """Longitudes ``first`` to ``first + KB`` of one grid's spectra: one product per chunk of
    its slots (``features`` the TF32 parts and ``features_low`` the rests with ``SPLIT``),
    stored in :func:`spin_spectra`'s layout."""
    acc = tl.zeros([KB * LAT, CHANNELS], dtype=tl.float32)
    factors = _longitude_factors(
        table_ptr, first, long, rows, before, after, fraction, slot_ok, KB, LAT, WIDTH
    )
    acc = _spectrum_dot(acc, factors, features, features_low, PRECISION, SPLIT)
    if REST:
        factors = _longitude_factors(
            table_ptr, first, long, rows_2, before_2, after_2, fraction_2, slot_ok_2, KB, LAT,
            REST,
        )  # fmt: skip
        acc = _spectrum_dot(acc, factors, features_2, features_low_2, PRECISION, SPLIT)
    if ROUND:
        acc = _tf32_rounded(acc)
    m = tl.arange(0, KB * LAT)
    k = first + m // LAT
    y = m % LAT
    channel = tl.arange(0, CHANNELS)
    # out [long, groups, n_grids, PER_GROUP * lat]: from one (k, group) plane to the next
    plane = tl.cast(n_grids, tl.int64) * (PER_GROUP * lat)  # a launch makes 1 a constant
    row_offset = (k * (channels // PER_GROUP)).to(tl.int64) * plane + y
    column_offset = (channel // PER_GROUP).to(tl.int64) * plane + (channel % PER_GROUP) * lat
    ok = ((k < long) & (y < lat))[:, None] & (channel < channels)[None, :]
    out = out_ptr + grid * (PER_GROUP * lat) + row_offset[:, None] + column_offset[None, :]
    tl.store(out, acc, mask=ok)


@triton.jit
def _spectra_product_kernel(
    values_ptr,
    index_ptr,
    column_ptr,
    fraction_ptr,
    table_ptr,
    row_ptr,
    rise_ptr,
    weight_ptr,
    out_ptr,
    n_grids,
    n_values,
    width,
    channels,
    long,
    lat,
    WIDTH: tl.constexpr,
    REST: tl.constexpr,
    CHANNELS: tl.constexpr,
    PER_GROUP: tl.constexpr,
    LAT: tl.constexpr,
    KB: tl.constexpr,
    KB_REST: tl.constexpr,
    WEIGHTED: tl.constexpr,
    ROUND: tl.constexpr,
    PRECISION: tl.constexpr,
    SPLIT: tl.constexpr,
) -> None:
    # one grid: its spectra in one or two blocks of longitudes (KB, then KB_REST: 12 as 8 + 4),
    # each [(k, y), slots] @ [slots, channels] for each chunk of its slots (WIDTH, REST)
    grid = tl.program_id(0).to(tl.int64)
    features, rows, before, after, fraction, slot_ok = _grid_values(
        values_ptr, index_ptr, column_ptr, fraction_ptr, row_ptr, rise_ptr, weight_ptr, grid,
        0, n_values, width, channels, long, lat, WIDTH, CHANNELS, LAT, WEIGHTED,
    )  # fmt: skip
    features_low = features
    if SPLIT:  # the values' TF32 parts and rests (an infinite or NaN value: a NaN rest)
        features, features_low = _tf32_parts(features)
    features_2, rows_2, before_2, after_2 = features, rows, before, after
    fraction_2, slot_ok_2, features_low_2 = fraction, slot_ok, features_low
    if REST:
        features_2, rows_2, before_2, after_2, fraction_2, slot_ok_2 = _grid_values(
            values_ptr, index_ptr, column_ptr, fraction_ptr, row_ptr, rise_ptr, weight_ptr,
            grid, WIDTH, n_values, width, channels, long, lat, REST, CHANNELS, LAT, WEIGHTED,
        )  # fmt: skip
        features_low_2 = features_2
        if SPLIT:
            features_2, features_low_2 = _tf32_parts(features_2)
    _spectra_block(
        table_ptr, out_ptr, grid, 0, n_grids, long, lat, channels, rows, before, after,
        fraction, slot_ok, features, features_low, rows_2, before_2, after_2, fraction_2,
        slot_ok_2, features_2, features_low_2, KB, LAT, WIDTH, REST, CHANNELS, PER_GROUP,
        ROUND, PRECISION, SPLIT,
    )  # fmt: skip
    if KB_REST:
        _spectra_block(
            table_ptr, out_ptr, grid, KB, n_grids, long, lat, channels, rows, before, after,
            fraction, slot_ok, features, features_low, rows_2, before_2, after_2, fraction_2,
            slot_ok_2, features_2, features_low_2, KB_REST, LAT, WIDTH, REST, CHANNELS,
            PER_GROUP, ROUND, PRECISION, SPLIT,
        )  # fmt: skip


@triton.jit
def _products_kernel(
    spectra_ptr,
    pairs_ptr,
    out_ptr,
    n_grids,
    n_groups,
    n_in,
    n_out,
    n_edge,
    n_middle,
    plane,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    SPLIT: tl.constexpr,
) -> None:
    # the column blocks of a row block are neighbouring programs: the second reads the
    # spectra from the cache
    column_blocks = tl.cdiv(2 * n_out, BLOCK_N)
    row_block = tl.program_id(0) // column_blocks
    rows = row_block.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    group = tl.program_id(1)
    cols = (tl.program_id(0) % column_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)  # of 2 n_out
    row_ok = rows < n_grids
    col_ok = cols < 2 * n_out
    in_second = cols >= n_out
    out_cols = group * n_out + tl.where(in_second, cols - n_out, cols)
    chunks = tl.cdiv(n_in, BLOCK_K)  # per entry
    for pair in range(1 + n_middle):
        # pair 0: the real entries 0 and, for an even long (n_edge 2), 1 (for an odd long no
        # second entry: entry 0 again, times the zero rows the pair's kernel has for it);
        # pair f + 1: frequency f's real and imaginary entries
        first = (n_edge + pair - 1) * (pair != 0)
        second = tl.where(pair == 0, 2 * n_edge - 3, first + n_middle)
        read_second = tl.maximum(second, 0)
        kernel = pairs_ptr + (pair * n_groups + group).to(tl.int64) * (4 * n_in * n_out)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        # [spectra of first, spectra of second] [rows, 2 n_in] @ kernel [2 n_in, 2 n_out]
        for step in range(2 * chunks):
            half = (step >= chunks).to(tl.int32)
            entry = first + half * (read_second - first)
            ks = (step - half * chunks) * BLOCK_K + tl.arange(0, BLOCK_K)
            k_ok = ks < n_in
            spectrum = spectra_ptr + ((entry * n_groups + group) * n_grids + rows) * n_in
            a = tl.load(
                spectrum[:, None] + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
            )
            # the pair's kernel is [2 n_out, 2 n_in] (paired_kernels: along the reduction)
            b_ptrs = kernel + cols[None, :] * (2 * n_in) + (half * n_in + ks)[:, None]
            acc = _dot_weight(
                acc, a, b_ptrs, k_ok[:, None] & col_ok[None, :], plane, PRECISION, SPLIT
            )
        entry = tl.where(in_second, second, first)  # [BLOCK_N], -1: no entry
        out = out_ptr + (entry[None, :] * n_grids + rows[:, None]) * (n_groups * n_out)
        tl.store(
            out + out_cols[None, :], acc, mask=row_ok[:, None] & (col_ok & (entry >= 0))[None, :]
        )


@triton.jit
def _inverse_kernel(
    products_ptr,
    inverse_ptr,
    bias_ptr,
    norm_weight_ptr,
    norm_bias_ptr,
    out_ptr,
    n_segments,
    n_columns,
    n_out,
    groups,
    long,
    eps,
    SEGMENTS: tl.constexpr,
    OUT: tl.constexpr,
    LONG: tl.constexpr,
    NORM: tl.constexpr,
    AFFINE: tl.constexpr,
) -> None:
    # a segment: one grid's n_out outputs of one group (a GroupNorm group), SEGMENTS of them
    # per program, each padded to OUT columns
    segments = tl.program_id(0).to(tl.int64) * SEGMENTS + tl.arange(0, SEGMENTS)
    outputs = tl.arange(0, OUT)
    inside = (segments < n_segments)[:, None] & (outputs < n_out)[None, :]  # [SEGMENTS, OUT]
    columns = segments[:, None] * n_out + outputs[None, :]  # of the [n, groups * n_out] output
    channels = (segments % groups)[:, None] * n_out + outputs[None, :]
    flat_columns = tl.reshape(columns, [SEGMENTS * OUT])
    flat_inside = tl.reshape(inside, [SEGMENTS * OUT])
    entry = tl.arange(0, LONG)
    entry_ok = entry < long
    # products [long, n_columns] -> conv [shift, column] = inverse^T [shift, entry] @ products
    products = tl.load(
        products_ptr + entry.to(tl.int64)[:, None] * n_columns + flat_columns[None, :],
        mask=entry_ok[:, None] & flat_inside[None, :],
        other=0.0,
    )
    inverse_t = tl.load(
        inverse_ptr + entry[None, :] * long + entry[:, None],
        mask=entry_ok[None, :] & entry_ok[:, None],
        other=0.0,
    )
    conv = tl.dot(inverse_t, products, input_precision="ieee")
    flat_channels = tl.reshape(channels, [SEGMENTS * OUT])
    conv += tl.load(bias_ptr + flat_channels, mask=flat_inside, other=0.0)[None, :]
    activated = tl.where(entry_ok[:, None], conv * tl.sigmoid(conv), 0.0)
    pooled = tl.reshape(tl.sum(activated, axis=0) / long, [SEGMENTS, OUT])
    if NORM:
        # GroupNorm over each segment: biased variance, as torch's
        mean = tl.sum(tl.where(inside, pooled, 0.0), axis=1) / n_out
        centred = tl.where(inside, pooled - mean[:, None], 0.0)
        variance = tl.sum(centred * centred, axis=1) / n_out
        pooled = centred * tl.rsqrt(variance + eps)[:, None]  # as torch's CUDA kernel
        if AFFINE:
            scale = tl.load(norm_weight_ptr + channels, mask=inside, other=0.0)
            pooled = pooled * scale + tl.load(norm_bias_ptr + channels, mask=inside, other=0.0)
    tl.store(out_ptr + columns, pooled, mask=inside)


def kernels_run_on(device: str | torch.device) -> bool:
    """Whether the kernels run on ``device``: a CUDA device (compiled), or any where Triton
    was first imported with ``TRITON_INTERPRET=1`` (its interpreter, for tests)."""
    return torch.device(device).type == "cuda" or isinstance(_mixture_kernel, InterpretedFunction)


def _launcher(kernel: triton.JITFunction, tensor: Tensor) -> triton.JITFunction:
    """``kernel``, checked to run on ``tensor``'s device: compiled for CUDA, or interpreted
    (numpy) where Triton was imported with ``TRITON_INTERPRET=1``."""
    if not (tensor.is_cuda or isinstance(kernel, InterpretedFunction)):
        raise RuntimeError(
            f"the Triton kernels run on CUDA tensors, got one on {tensor.device} (on the CPU "
            "they run in Triton's interpreter, for tests: set TRITON_INTERPRET=1 before "
            "triton is first imported)"
        )
    return kernel


def _dot_size(n: int) -> int:
    """The smallest power of two >= ``n`` and >= 16 (``tl.dot``'s smallest tile side)."""
    return max(16, triton.next_power_of_2(n))


def power_of_two_chunks(n: int, smallest: int) -> tuple[int, int]:
    """``n`` as one power-of-two chunk of at least ``smallest``, or two where they pad less
    (40 as 32 + 16, not 64); the second 0 where there is one."""
    whole = max(smallest, triton.next_power_of_2(n))
    first = whole // 2
    rest = max(smallest, triton.next_power_of_2(max(1, n - first)))
    if n > first >= smallest and first + rest < whole:
        return first, rest
    return whole, 0


def slot_chunks(width: int) -> tuple[int, int]:
    """A grid's ``width`` slots as :func:`spin_spectra` reduces them: one power-of-two chunk
    (``tl.dot``'s reduction, at least 16), or two where they pad less (40 as 32 + 16)."""
    return power_of_two_chunks(width, 16)


def tile_sizes(tiles: tuple[int, int, int], n_in: int) -> tuple[int, int, int]:
    """A product's ``(rows, columns, reduction)`` tiles for a reduction of ``n_in``: the
    reduction tile at most the smallest ``tl.dot`` side >= ``n_in``."""
    block_m, block_n, block_k = tiles
    return block_m, block_n, min(block_k, _dot_size(n_in))


def _product_grid(
    tiles: tuple[int, int, int], n: int, n_out: int, n_in: int
) -> tuple[tuple[int, int], int, int, int]:
    """The programs ``(row blocks, column blocks)`` of a product's ``[n, n_out]`` output with
    a reduction of ``n_in``, and its tiles (:func:`tile_sizes`)."""
    block_m, block_n, block_k = tile_sizes(tiles, n_in)
    return (triton.cdiv(n, block_m), triton.cdiv(n_out, block_n)), block_m, block_n, block_k


def _check_float32(*tensors: Tensor) -> None:
    for tensor in tensors:
        if tensor.dtype != torch.float32:
            raise TypeError(f"the Triton kernels take float32 tensors, got {tensor.dtype}")


def _second_factor(weight: Tensor, precision: str) -> tuple[Tensor, int, bool]:
    """A product's second factor as its kernel reads it at ``precision``, contiguous: split
    (:func:`tf32_split`) for ``tf32x3`` where :data:`SPLIT_WEIGHTS`, else as it is; the
    numbers between its two parts; whether split."""
    if precision == "tf32x3" and SPLIT_WEIGHTS:
        return tf32_split(weight), weight.numel(), True
    return weight.contiguous(), 0, False


def linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    swish: bool = False,
    precision: str = "tf32x3",
    rounded: bool = False,
    addend: Tensor | None = None,
) -> Tensor:
    """``x @ weight.T + bias``, plus ``addend`` if given, then Swish if ``swish``
    (``nn.Linear``, a residual sum and the activation in one pass, the product at
    ``precision``), rounded to TF32 numbers if ``rounded`` (:func:`tf32_rounded`: the input of
    a ``tf32`` product).

    Args:
        x: ``[n, n_in]`` float32.
        weight: ``[n_out, n_in]``; bias: ``[n_out]``.
        addend: ``[n, n_out]``, added before the Swish.

    Returns:
        ``[n, n_out]``.
    """
    _check_float32(x, weight, bias)
    x = x.contiguous()
    (n, n_in), n_out = x.shape, weight.shape[0]
    out = x.new_empty(n, n_out)
    if addend is not None:
        _check_float32(addend)
        if addend.shape != out.shape:
            raise ValueError(
                f"addend of shape {tuple(addend.shape)} for an output of {tuple(out.shape)}"
            )
        addend = addend.contiguous()
    if n == 0:
        return out
    grid, block_m, block_n, block_k = _product_grid(LINEAR_TILES, n, n_out, n_in)
    weight, plane, split = _second_factor(weight, precision)
    _launcher(_linear_kernel, x)[grid](
        x, weight, bias.contiguous(), out if addend is None else addend, out, n, n_in, n_out,
        plane, block_m, block_n, block_k, addend is not None, swish, rounded, precision, split,
        num_warps=LINEAR_WARPS, num_stages=LINEAR_STAGES,
    )  # fmt: skip
    return out


def basis_linear(
    distances: Tensor,
    offset: Tensor,
    coeff: float,
    weight: Tensor,
    bias: Tensor,
    precision: str = "tf32x3",
) -> Tensor:
    """``exp(coeff (d - offset)^2) @ weight.T + bias``: the Gaussian radial basis of the
    distances (:class:`~forcecalc.models.blocks.GaussianSmearing`) and the linear layer after
    it in one pass, the basis made in registers (never stored).

    Args:
        distances: ``[n]`` float32.
        offset: ``[n_basis]`` the Gaussians' centres.
        weight: ``[n_out, n_basis]``; bias: ``[n_out]``.

    Returns:
        ``[n, n_out]``.
    """
    _check_float32(distances, offset, weight, bias)
    distances = distances.contiguous()
    n, (n_out, n_basis) = len(distances), weight.shape
    if offset.shape != (n_basis,):
        raise ValueError(f"{tuple(offset.shape)} centres for a layer of {n_basis} inputs")
    out = distances.new_empty(n, n_out)
    if n == 0:
        return out
    grid, block_m, block_n, block_k = _product_grid(LINEAR_TILES, n, n_out, n_basis)
    weight, plane, split = _second_factor(weight, precision)
    _launcher(_basis_linear_kernel, distances)[grid](
        distances, offset.contiguous(), weight, bias.contiguous(), out, n, n_basis, n_out,
        coeff, plane, block_m, block_n, block_k, precision, split,
        num_warps=LINEAR_WARPS, num_stages=LINEAR_STAGES,
    )  # fmt: skip
    return out


def splat_directions(
    frames: Tensor, unit: Tensor, index: Tensor, lat: int, long: int, pole_eps2: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`~forcecalc.models.spinconv.splat_factors` of the directions ``unit[index[n, j]]``
    in the frames ``frames[n]`` (float64), from the frames: the projection, the pole's
    convention and the grid positions in two passes beside ``atan2`` and ``asin`` (PyTorch's,
    in place), without the gathered and projected ``[n, width, 3]`` directions and the
    twenty-odd element-wise passes of the PyTorch path.  The same formulas; compiled for CUDA,
    Triton fuses multiplications and additions (one rounding) and PyTorch divides by a number
    through its reciprocal, so the last bits may differ: a position exactly on a grid line may
    come out as the neighboring cell's edge (fraction 1 of the cell before instead of 0: the
    same splat), a direction within ~1e-15 of the pole's radius on the other side of it.
    (Launched without Triton's ``enable_fp_fusion=False``: ``torch.compile`` takes only the
    warps and stages of a user kernel's launch options.)

    Args:
        frames: ``[n, 3, 3]`` float64 rows of each frame.
        unit: ``[n_values, 3]`` float64 directions.
        index: ``[n, width]`` int64 rows of ``unit``, ``n_values`` for padding.
        pole_eps2: squared distance from the polar axis within which a direction is on it.

    Returns:
        ``column`` and ``row`` ``[n, width]`` int64, ``fraction`` and ``rise`` (zero for
        padding) ``[n, width]`` float32: the factors of a
        :class:`~forcecalc.models.spinconv.LongitudeSplat` and a
        :class:`~forcecalc.models.spinconv.LatitudeSplat`.
    """
    for tensor in (frames, unit):
        if tensor.dtype != torch.float64:
            raise TypeError(f"the grid geometry is float64, got {tensor.dtype}")
    if frames.shape[1:] != (3, 3) or unit.shape[1:] != (3,):
        raise ValueError(
            f"frames [n, 3, 3] and directions [n_values, 3], got {tuple(frames.shape)} and "
            f"{tuple(unit.shape)}"
        )
    n, width = index.shape
    if len(frames) != n:
        raise ValueError(f"{len(frames)} frames for {n} rows of readers")
    index = index.contiguous()
    column, row = torch.empty_like(index), torch.empty_like(index)
    fraction = unit.new_empty(n, width, dtype=torch.float32)
    rise = torch.empty_like(fraction)
    if n * width == 0:
        return column, fraction, row, rise
    grid = (triton.cdiv(n * width, ELEMENTWISE_ENTRIES),)
    angles = unit.new_empty(3, n, width)
    _launcher(_directions_kernel, unit)[grid](
        frames.contiguous(), unit.contiguous(), index, angles, n * width, width, len(unit),
        pole_eps2, ELEMENTWISE_ENTRIES, num_warps=ELEMENTWISE_WARPS,
    )  # fmt: skip
    torch.atan2(angles[0], angles[1], out=angles[0])
    angles[2].asin_()
    _launcher(_bins_kernel, unit)[grid](
        angles, index, column, fraction, row, rise, n * width, len(unit), long, lat,
        ELEMENTWISE_ENTRIES, num_warps=ELEMENTWISE_WARPS,
    )  # fmt: skip
    return column, fraction, row, rise


def mixture_of_experts(
    h: Tensor, weight: Tensor, bias: Tensor, mixture: Tensor, precision: str = "tf32x3"
) -> Tensor:
    """``sum_k mixture[:, k] * silu(h @ weight[k * mid:(k + 1) * mid].T + bias[k * mid:...])``.

    Args:
        h: ``[n, n_in]`` float32 inputs of the experts.
        weight: ``[n_experts * mid, n_in]`` (OCP's ``fc2.weight``).
        bias: ``[n_experts * mid]``.
        mixture: ``[n, n_experts]`` weights of the experts per row.

    Returns:
        ``[n, mid]``.
    """
    _check_float32(h, weight, bias, mixture)
    h, mixture = h.contiguous(), mixture.contiguous()
    n, n_in = h.shape
    n_experts = mixture.shape[1]
    mid = weight.shape[0] // n_experts
    out = h.new_empty(n, mid)
    if n == 0:
        return out
    grid, block_m, block_n, block_k = _product_grid(MIXTURE_TILES, n, mid, n_in)
    weight, plane, split = _second_factor(weight, precision)
    _launcher(_mixture_kernel, h)[grid](
        h, weight, bias.contiguous(), mixture, out, n, n_in, mid, n_experts, plane,
        block_m, block_n, block_k, precision, split,
        num_warps=MIXTURE_WARPS, num_stages=MIXTURE_STAGES,
    )  # fmt: skip
    return out


def spin_spectra(
    values: Tensor,
    index: Tensor,
    longitude: LongitudeSplat,
    latitude: LatitudeSplat,
    groups: int,
    precision: str = "tf32x3",
    rounded: bool = False,
) -> Tensor:
    """Packed longitude spectra of grids (see :func:`~forcecalc.models.spinconv.splat_factors`):
    grid ``g`` receives ``values[index[g, j]]`` splatted with the factors ``longitude`` and
    ``latitude`` at ``[g, j]`` (their ``phase`` and ``rows`` are interpolated here, never
    stored), the products at ``precision``; rounded to TF32 numbers if ``rounded`` (the input
    of ``tf32`` products).

    Args:
        values: ``[n_values, C]`` float32 messages.
        index: ``[n, width]`` int64 rows of ``values``, ``n_values`` for padding (the entries
            that ``latitude`` has as not valid).
        longitude: columns ``[n, width]`` int64, fractions ``[n, width]`` float32 and the
            ``[long, long]`` float32 table.
        latitude: rows ``[n, width]`` int64, fractions and weights (if any) ``[n, width]``
            float32.
        groups: channel groups of the convolution (``C // groups`` channels each).

    Returns:
        ``[long, groups, n, (C // groups) * lat]``: entry ``k`` of the packed spectrum of
        channel ``c = group * (C // groups) + i`` at latitude ``y`` in column ``i * lat + y``.
    """
    weight = latitude.fraction if latitude.weight is None else latitude.weight  # unread if None
    _check_float32(values, longitude.fraction, longitude.table, latitude.fraction, weight)
    values, index = values.contiguous(), index.contiguous()
    column, fraction = longitude.column.contiguous(), longitude.fraction.contiguous()
    row, rise = latitude.row.contiguous(), latitude.fraction.contiguous()
    n, width = index.shape
    channels, long, lat = values.shape[1], longitude.long, latitude.lat
    per_group = channels // groups
    out = values.new_empty(long, groups, n, per_group * lat)
    if n == 0:
        return out
    split = precision == "tf32x3" and SPLIT_WEIGHTS
    table, weight = longitude.table.contiguous(), weight.contiguous()
    slots, longitudes = slot_chunks(width), power_of_two_chunks(long, 1)
    if SPECTRA_ONE_PRODUCT and longitudes[0] * _dot_size(lat) * sum(slots) <= ONE_PRODUCT_FACTOR:
        _launcher(_spectra_product_kernel, values)[(n,)](
            values, index, column, fraction, table, row, rise, weight, out, n, len(values),
            width, channels, long, lat, *slots, _dot_size(channels), per_group,
            _dot_size(lat), *longitudes, latitude.weight is not None,
            rounded, precision, split, num_warps=SPECTRA_ONE_PRODUCT_WARPS, num_stages=1,
        )  # fmt: skip
        return out
    grid = (triton.cdiv(n, SPECTRA_GRIDS),)
    _launcher(_spectra_kernel, values)[grid](
        values, index, column, fraction, table, row, rise, weight, out, n, len(values), width,
        channels, per_group, long, lat, SPECTRA_GRIDS, *slots,
        _dot_size(channels), _dot_size(lat), latitude.weight is not None, rounded, precision,
        split, num_warps=SPECTRA_WARPS, num_stages=SPECTRA_STAGES,
    )  # fmt: skip
    return out


def spin_pool(
    spectra: Tensor,
    pairs: Tensor,
    inverse: Tensor,
    bias: Tensor,
    precision: str = "tf32x3",
    norm: nn.GroupNorm | None = None,
) -> Tensor:
    """The spin convolution of packed spectra: the circular convolution (the kernels' products
    per frequency, then the inverse DFT), its bias, Swish and the mean over the longitudinal
    shifts, then ``norm`` if given (a GroupNorm with a group per group of the convolution:
    each grid's outputs of a group normalized in the same pass).

    Args:
        spectra: ``[long, groups, n, K]`` from :func:`spin_spectra`.
        pairs: the kernels' products, :func:`paired_kernels` ``[1 + n_middle, groups, 2 M,
            2 K]`` (made once for all chunks of grids; for ``tf32x3``, split on each call:
            :data:`SPLIT_WEIGHTS`).
        inverse: the inverse DFT ``[long, long]``
            (:meth:`~forcecalc.models.spinconv.SpinConvBlock.kernel_spectra`).
        bias: ``[groups * M]``, the convolution's.
        norm: ``GroupNorm(groups, groups * M)``.

    Returns:
        ``[n, groups * M]``.
    """
    _check_float32(spectra, pairs, inverse, bias)
    long, groups, n, n_in = spectra.shape
    n_out = pairs.shape[-2] // 2
    if pairs.shape[1:] != (groups, 2 * n_out, 2 * n_in):
        raise ValueError(
            f"kernels' products {tuple(pairs.shape)} for spectra {tuple(spectra.shape)}: "
            "paired_kernels makes [1 + n_middle, groups, 2 M, 2 K]"
        )
    norm_weight, norm_bias, eps = bias, bias, 0.0  # unread without a norm's scale and shift
    if norm is not None:
        if (norm.num_groups, norm.num_channels) != (groups, groups * n_out):
            raise ValueError(
                f"a GroupNorm of {norm.num_groups} groups of {norm.num_channels} channels after "
                f"a convolution of {groups} groups of {n_out} outputs"
            )
        if norm.affine:
            norm_weight, norm_bias = norm.weight.contiguous(), norm.bias.contiguous()
            _check_float32(norm_weight, norm_bias)
        eps = norm.eps
    out = spectra.new_empty(n, groups * n_out)
    if n == 0:
        return out
    n_middle = (long - 1) // 2  # frequencies with an imaginary part; long = n_edge + 2 n_middle
    block_m, block_n, block_k = tile_sizes(PRODUCTS_TILES, n_in)
    products = spectra.new_empty(long, n, groups * n_out)
    grid = (triton.cdiv(n, block_m) * triton.cdiv(2 * n_out, block_n), groups)
    pairs, plane, split = _second_factor(pairs, precision)
    _launcher(_products_kernel, spectra)[grid](
        spectra.contiguous(), pairs, products, n, groups, n_in, n_out,
        long - 2 * n_middle, n_middle, plane, block_m, block_n, block_k, precision, split,
        num_warps=PRODUCTS_WARPS, num_stages=PRODUCTS_STAGES,
    )  # fmt: skip
    padded = triton.next_power_of_2(n_out)
    per_program = max(1, INVERSE_COLUMNS // padded)
    _launcher(_inverse_kernel, spectra)[(triton.cdiv(n * groups, per_program),)](
        products, inverse.contiguous(), bias.contiguous(), norm_weight, norm_bias, out,
        n * groups, n * groups * n_out, n_out, groups, long, eps, per_program, padded,
        _dot_size(long), norm is not None, norm is not None and norm.affine,
    )  # fmt: skip
    return out


def tf32_rounded(x: Tensor) -> Tensor:
    """``x`` (float32) rounded to the nearest TF32 number (10 mantissa bits, ties away from
    zero, NaN kept: a NaN's bits could carry into the sign): a weight that a ``tf32`` product
    reads (which would drop the low bits instead)."""
    _check_float32(x)
    x = x.contiguous()
    bits = (x.view(torch.int32) + 0x1000) & -8192
    return torch.where(x.isnan(), x, bits.view(torch.float32))


def tf32_split(x: Tensor) -> Tensor:
    """``x`` (float32) as two TF32 numbers per number, ``[2, *x.shape]``: the nearest one
    (:func:`tf32_rounded`) and the one nearest the rest (zero where ``x`` is infinite), whose
    sum is ``x`` to about 2^-22 of it (a finite ``x`` within 2^-12 of float32's largest
    rounds to infinity, as the GPU's ``cvt.rna``): the second factor of a ``tf32x3`` product
    (:data:`SPLIT_WEIGHTS`), split once where Triton's ``tf32x3`` splits it at every step."""
    _check_float32(x)
    x = x.contiguous()
    out = x.new_empty(2, *x.shape)
    if x.numel():
        _launcher(_split_kernel, x)[(triton.cdiv(x.numel(), ELEMENTWISE_ENTRIES),)](
            x, out, x.numel(), ELEMENTWISE_ENTRIES, num_warps=ELEMENTWISE_WARPS
        )
    return out


def paired_kernels(real: Tensor, imag: Tensor, long: int) -> Tensor:
    """The kernels' products as one real matrix per pair of packed entries and group, ``[1 +
    n_middle, groups, 2 M, 2 K]`` (each transposed: its rows along the reduction, as the
    tensor cores take a TF32 factor), from ``conj(DFT(kernel)) = real + i imag`` ``[long // 2 + 1,
    groups, K, M]`` (:meth:`~forcecalc.models.spinconv.SpinConvBlock.kernel_spectra`): the
    real entries (``[[real_0, 0], [0, real_long/2]]``, the
    second block zero for an odd ``long``), then each middle frequency's real and imaginary
    entries, ``(re + i im) conj(W) = (re real - im imag) + i (re imag + im real)`` as
    ``[[real, imag], [-imag, real]]``: one plain product per pair (four real products per
    frequency where Gauss's trick takes three, and one accumulator where it takes three)."""
    _, groups, n_in, n_out = real.shape
    n_middle = (long - 1) // 2
    pairs = real.new_zeros(1 + n_middle, groups, 2 * n_in, 2 * n_out)
    pairs[0, :, :n_in, :n_out] = real[0]
    if long % 2 == 0 and long > 1:
        pairs[0, :, n_in:, n_out:] = real[long // 2]
    middle_real, middle_imag = real[1 : 1 + n_middle], imag[1 : 1 + n_middle]
    pairs[1:, :, :n_in, :n_out] = middle_real
    pairs[1:, :, :n_in, n_out:] = middle_imag
    pairs[1:, :, n_in:, :n_out] = -middle_imag
    pairs[1:, :, n_in:, n_out:] = middle_real
    return pairs.transpose(-1, -2).contiguous()


def with_triton_kernels(module: nn.Module, precision: str = "tf32x3") -> nn.Module:
    """A copy of ``module`` (a SpinConv model, or a :class:`~forcecalc.checkpoint.Potential`
    holding one; weights copied) whose mixtures of experts, spin convolutions, distance layers
    and grids' splat factors use the fused kernels wherever they can: float32 inputs, no
    autograd recording, the blocks' own weights included (a force-centric model's forward;
    an energy-centric model's forces need the backward pass: its blocks keep the PyTorch
    path, and so does its geometry unless its forces are OCP's ``compat`` ones, which do not
    differentiate the grids).

    ``precision``: ``"tf32x3"`` (near float32's accuracy, three TF32 tensor-core products per
    product), ``"tf32"`` or ``"ieee"`` for every product, or ``"mixed"``: one TF32 product in
    the bulk of the work, every mixture of experts but the energy block's and the spin
    convolutions' frequency products, their inputs rounded to the nearest TF32 number
    (Triton's ``tf32`` drops the low bits instead: a bias that adds up in the energy), and
    ``tf32x3`` in the linear layers, the spectra and the energy block (emulated errors of each
    choice: ``benchmarks/README.md``, ``benchmarks/tf32_emulate.py``)."""
    from forcecalc.models.spinconv import (
        DistanceBlock,
        EmbeddingBlock,
        MessageBlock,
        SpinConv,
        SpinConvBlock,
    )

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    module = copy.deepcopy(module)
    fused = EmbeddingBlock | SpinConvBlock | MessageBlock | SpinConv | DistanceBlock
    blocks = [m for m in module.modules() if isinstance(m, fused)]
    if not blocks:
        raise ValueError(f"{type(module).__name__} holds no SpinConv blocks")
    for block in blocks:
        block.triton_precision = precision
    if precision == "mixed":
        for model in module.modules():
            if isinstance(model, SpinConv):
                model.energyembeddingblock.triton_precision = "tf32x3"
    return module


def product_precisions(precision: str) -> tuple[str, str, bool]:
    """The ``tl.dot`` precisions of a block's linear layers and spectra, and of its bulk
    products (mixtures of experts, frequency products), under a :func:`with_triton_kernels`
    ``precision``, and whether the bulk products' inputs are to be rounded (by
    :func:`tf32_rounded` or the kernels' ``rounded`` option): ``"mixed"`` is ``tf32x3`` and
    ``tf32`` on rounded inputs."""
    if precision == "mixed":
        return "tf32x3", "tf32", True
    return precision, precision, False
