"""The fused Triton kernels compute what SpinConv's PyTorch operators compute: the mixture of
experts, the spin convolution's spectra and its pooled convolution, and a whole force-centric
forward.  On a machine without CUDA they run in Triton's interpreter (``tests/conftest.py``
chooses it); sizes are odd on purpose, so every tile has masked rows and columns."""

from __future__ import annotations

import collections
import contextlib
import copy
import inspect
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from devices import CUDA
from ocp_fixtures import load_ocp_raw, ocp_structures

pytest.importorskip("triton", reason="the fused kernels need triton (pip install triton)")

from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from forcecalc.graph.batch import Batch
from forcecalc.graph.gather import RowIndex
from forcecalc.models import triton_kernels
from forcecalc.models.blocks import GaussianSmearing
from forcecalc.models.spinconv import (
    POLE_EPS2,
    DistanceBlock,
    EmbeddingBlock,
    LatitudeSplat,
    LongitudeSplat,
    MessageBlock,
    SphereProjections,
    SpinConv,
    SpinConvBlock,
    splat_factors,
    swish_layers,
)
from forcecalc.models.triton_kernels import (
    basis_linear,
    linear,
    mixture_of_experts,
    paired_kernels,
    spin_pool,
    spin_spectra,
    splat_directions,
    tf32_rounded,
    tf32_split,
    with_triton_kernels,
)

#: The envelope variants of the OCP fixtures (20 neighbors kept within 6 Å) cut in every
#: slab: the warning that says so (tested on its own) is not these tests' subject.
pytestmark = pytest.mark.filterwarnings(
    "ignore:an atom has more than .* neighbors within:forcecalc.warning.ForcecalcWarning"
)

INTERPRETED = isinstance(triton_kernels._mixture_kernel, InterpretedFunction)
#: The devices the kernels can run on here: CUDA where available, the CPU in the interpreter.
KERNEL_DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(not INTERPRETED, reason="TRITON_INTERPRET is not set"),
    ),
    pytest.param("cuda", marks=CUDA),
]
PRECISIONS = ["ieee", "tf32x3"]
#: The fused kernels' entry points that SpinConv's blocks call.
KERNEL_FUNCTIONS = (
    "linear",
    "basis_linear",
    "mixture_of_experts",
    "splat_directions",
    "spin_spectra",
    "spin_pool",
)
#: Large tiles: fewer programs for Triton's interpreter to run one by one.
INTERPRETER_TILES = {
    "MIXTURE_TILES": (256, 64, 32),
    "SPECTRA_GRIDS": 16,
    "PRODUCTS_TILES": (128, 64, 64),
    "INVERSE_COLUMNS": 1024,
}


@pytest.fixture(params=[False, True], ids=["spectra-per-longitude", "spectra-one-product"])
def spectra_product(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Each spectra kernel: one product per longitude, or each grid's spectra as one product
    (``SPECTRA_ONE_PRODUCT``)."""
    monkeypatch.setattr(triton_kernels, "SPECTRA_ONE_PRODUCT", request.param)
    return request.param


def _small_force_centric(device: str, monkeypatch, **options) -> SpinConv:
    """The small force-centric fixture model (OCP's weights; ``options`` to ``SpinConv``) on
    ``device``; in Triton's interpreter the kernels' tiles large (its cost is per program;
    the default tiles are the kernel tests')."""
    if device == "cpu":
        for name, value in INTERPRETER_TILES.items():
            monkeypatch.setattr(triton_kernels, name, value)
    raw = load_ocp_raw("spinconv_small_fc")
    model = SpinConv(**raw["config"]["model_attributes"], **options)
    state = {k.removeprefix("module."): v for k, v in raw["state_dict"].items()}
    model.load_state_dict(state, strict=True)
    return model.to(device)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_mixture_of_experts_equals_the_blocks_operators(device, precision):
    """``sum_k w_k silu(h W_k^T + b_k)`` without the ``[n, 8 x mid]`` expert outputs: the
    block's PyTorch forward and its fused forward agree to float32 rounding (70 rows, 40-wide
    experts: partial tiles in every direction)."""
    torch.manual_seed(1)
    block = EmbeddingBlock(24, 7, 40, 5, 20).to(device)
    x = torch.randn(70, 24, device=device)
    source, target = (torch.randint(1, 20, (70,), device=device) for _ in range(2))
    with torch.no_grad():
        reference = block(x, source, target)
        fused = copy.deepcopy(block)
        fused.triton_precision = precision
        out = fused(x, source, target)
    assert _relative(out, reference) < 1e-5


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_mixture_of_experts_is_the_weighted_sum_of_experts(device):
    """The kernel itself against its definition in float64 (fresh random inputs)."""
    torch.manual_seed(2)
    n, n_in, mid, experts = 33, 20, 17, 3
    h = torch.randn(n, n_in, device=device)
    weight = torch.randn(experts * mid, n_in, device=device)
    bias = torch.randn(experts * mid, device=device)
    mixture = torch.softmax(torch.randn(n, experts, device=device), dim=1)
    out = mixture_of_experts(h, weight, bias, mixture, "ieee")
    expected = torch.zeros(n, mid, dtype=torch.float64, device=device)
    for k in range(experts):
        rows = slice(k * mid, (k + 1) * mid)
        pre = h.double() @ weight[rows].double().T + bias[rows].double()
        expected += mixture[:, k : k + 1].double() * torch.nn.functional.silu(pre)
    assert _relative(out.double(), expected) < 1e-5


@pytest.mark.parametrize(("swish", "add"), [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_linear_is_the_layer_its_residual_sum_and_swish(device, swish, add):
    """``x W^T + b`` (plus a residual, then Swish) in one kernel: ``nn.Linear``'s numbers in
    float64 to float32 rounding (37 x 45 -> 19: partial tiles everywhere); an addend of
    another shape is refused."""
    torch.manual_seed(6)
    layer = torch.nn.Linear(45, 19).to(device)
    x = torch.randn(37, 45, device=device)
    addend = torch.randn(37, 19, device=device) if add else None
    with torch.no_grad():
        expected = layer.double()(x.double())
        layer.float()
        out = linear(x, layer.weight, layer.bias, swish, "ieee", addend=addend)
    expected = expected + addend.double() if add else expected
    expected = torch.nn.functional.silu(expected) if swish else expected
    assert out.shape == (37, 19)
    assert _relative(out.double(), expected) < 1e-5
    with pytest.raises(ValueError, match="addend of shape"):
        linear(x, layer.weight, layer.bias, addend=torch.zeros(37, 18, device=device))


def _grids(device: str, n: int, width: int, n_values: int, lat: int, long: int) -> tuple:
    """Random directions of random readers (with padding) as splat factors."""
    index = torch.randint(0, n_values + 1, (n, width), device=device)
    directions = torch.nn.functional.normalize(
        torch.randn(n, width, 3, dtype=torch.float64, device=device), dim=-1
    )
    longitude, latitude = splat_factors(directions, index < n_values, lat, long, torch.float32)
    return index, longitude, latitude


@pytest.mark.parametrize(
    ("long", "weighted", "width"),
    [(7, False, 11), (8, False, 11), (8, True, 11), (7, True, 37), (8, False, 40)],
)
@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.usefixtures("spectra_product")
def test_spin_convolution_equals_the_blocks_operators(device, long, weighted, width):
    """Spectra straight from the splat factors (the bilinear weights interpolated in the
    kernel), then the kernels' products, inverse DFT, bias, Swish, mean and GroupNorm (its
    scale and shift random; 36 outputs per group, not a power of two): equal
    to the PyTorch spin convolution (through the splat weights and the packed spectra) for an
    odd and an even number of longitudes, with each value weighted (an envelope model's
    grids), and with 37 or 40 values per grid (reduced in two chunks, 32 + 16); 72 outputs in 2
    groups: a pair's 72 product columns span two column blocks, the second partial."""
    assert triton_kernels.slot_chunks(width) == ((16, 0) if width == 11 else (32, 16))
    torch.manual_seed(3)
    channels, mid, lat, n, n_values = 16, 72, 5, 21, 30
    block = SpinConvBlock(channels, mid, lat, long).to(device).eval()
    with torch.no_grad():
        block.conv1.bias.normal_()
        block.GroupNorm.weight.normal_()
        block.GroupNorm.bias.normal_()
    index, longitude, latitude = _grids(device, n, width, n_values, lat, long)
    projections = SphereProjections(RowIndex(index, n_values), longitude, latitude)
    if weighted:
        projections = projections.weighted(torch.rand(n, width, device=device))
    values = torch.randn(n_values, channels, device=device)
    with torch.no_grad():
        reference = projections.spin_convolution(block, values)
        fused = copy.deepcopy(block)
        fused.triton_precision = "tf32x3"
        out = projections.spin_convolution(fused, values)
    assert out.shape == (n, mid)
    assert _relative(out, reference) < 1e-5


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.usefixtures("spectra_product")
def test_spectra_of_a_lone_grid(device):
    """A launch makes an integer argument of 1 a compile-time constant (Triton's
    specialization; not in the interpreter): the spectra of one grid alone (a chunk of one
    grid, as the fused forward's last chunk can be) are its spectra among others, in
    SpinConv-All's shape (40 values, 12 longitudes, 16 latitudes, 32 channels in 4 groups)."""
    torch.manual_seed(12)
    index, longitude, latitude = _grids(device, 3, 40, 50, 16, 12)
    values = torch.randn(50, 32, device=device)
    together = spin_spectra(values, index, longitude, latitude, 4)
    alone = spin_spectra(values, index[:1], longitude.split(1)[0], latitude.split(1)[0], 4)
    assert alone.shape == (12, 4, 1, 128)
    assert _relative(alone, together[:, :, :1]) < 1e-6


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_one_product_spectra_only_where_their_factor_is_small(device, monkeypatch):
    """Each grid's spectra as one product (``SPECTRA_ONE_PRODUCT``) where its factor of
    longitudes x latitudes by values stays within ``ONE_PRODUCT_FACTOR`` (SpinConv-All's 12 x
    16 by 40); the per-longitude kernel, whose footprint does not grow with the longitudes,
    for 16 x 16 by 40 (shared memory and registers beyond a program's)."""
    monkeypatch.setattr(triton_kernels, "SPECTRA_ONE_PRODUCT", True)
    launched = []

    def launcher(kernel: Any, tensor: torch.Tensor) -> Any:
        launched.append(kernel)
        return plain(kernel, tensor)

    plain = triton_kernels._launcher
    monkeypatch.setattr(triton_kernels, "_launcher", launcher)
    for long, kernel in ((12, "_spectra_product_kernel"), (16, "_spectra_kernel")):
        index, longitude, latitude = _grids(device, 2, 40, 10, 16, long)
        spin_spectra(torch.randn(10, 32, device=device), index, longitude, latitude, 4)
        assert launched.pop() is getattr(triton_kernels, kernel)


def test_longitudes_of_one_product_spectra_pad_least():
    """Each grid's spectra as one product take their longitudes in one or two power-of-two
    blocks (rows of longitude x latitude), two where that pads less: SpinConv-All's 12 as
    8 + 4, 7 as one block of 8."""
    chunks = triton_kernels.power_of_two_chunks
    assert [chunks(n, 1) for n in (1, 2, 3, 5, 7, 8, 12, 16, 20)] == [
        (1, 0), (2, 0), (2, 1), (4, 1), (8, 0), (8, 0), (8, 4), (16, 0), (16, 4),
    ]  # fmt: skip


def test_slot_chunks_pad_a_grids_values_least():
    """A grid's values are reduced in one power-of-two chunk (``tl.dot``'s reduction, at least
    16), or in two where that pads less: 40 (SpinConv-All) as 32 + 16, not 64; 20 as 32,
    not 16 + 16; 50 as 64, not 32 + 32."""
    chunks = triton_kernels.slot_chunks
    assert [chunks(w) for w in (1, 16, 17, 20, 33, 40, 48, 49, 50, 64, 65, 80, 100)] == [
        (16, 0), (16, 0), (32, 0), (32, 0), (32, 16), (32, 16), (32, 16), (64, 0), (64, 0),
        (64, 0), (64, 16), (64, 16), (128, 0),
    ]  # fmt: skip
    for width in range(1, 200):
        first, rest = chunks(width)
        assert first + rest >= width and first + rest <= triton_kernels._dot_size(width)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.usefixtures("spectra_product")
def test_spectra_layout_and_pool_of_known_spectra(device, monkeypatch):
    """The spectra come out frequency-major, ``[long, groups, n, (C / groups) lat]`` (the
    block's own permutation of ``[n, C, long, lat]``), and the pooled convolution of those
    spectra equals the block's forward before its GroupNorm, and after it with a GroupNorm
    given (one without scale and shift, a large eps: inside the square root), also with
    programs smaller than a group's outputs; a GroupNorm of other groups and kernels' products
    of another layout are refused."""
    torch.manual_seed(4)
    channels, mid, lat, long, width, n, n_values = 16, 8, 3, 6, 9, 10, 14
    groups = channels // 8
    index, longitude, latitude = _grids(device, n, width, n_values, lat, long)
    values = torch.randn(n_values, channels, device=device)
    spectra = spin_spectra(values, index, longitude, latitude, groups, "ieee")
    padded = torch.cat([values, values.new_zeros(1, channels)])[index]  # [n, width, C]
    phase, rows = longitude.phase, latitude.rows
    weights = (phase.unsqueeze(-1) * rows.unsqueeze(-2)).flatten(-2)  # [n, width, long * lat]
    grid_spectra = (padded.transpose(1, 2) @ weights).view(n, channels, long, lat)
    expected = grid_spectra.view(n, groups, 8, long, lat).permute(3, 1, 0, 2, 4)
    assert _relative(spectra, expected.reshape(long, groups, n, 8 * lat)) < 1e-5

    block = SpinConvBlock(channels, mid, lat, long).to(device)
    norm = torch.nn.GroupNorm(groups, mid, eps=0.5, affine=False)
    block.GroupNorm = torch.nn.Identity()
    with torch.no_grad():
        block.conv1.bias.normal_()
        real, imag, inverse = block.kernel_spectra()
        pairs = paired_kernels(real, imag, long)
        pooled = spin_pool(spectra, pairs, inverse, block.conv1.bias, "ieee")
        normalized = spin_pool(spectra, pairs, inverse, block.conv1.bias, "ieee", norm)
        direct = block(grid_spectra)
    assert _relative(pooled, direct) < 1e-5
    assert _relative(normalized, norm(direct)) < 1e-5
    monkeypatch.setattr(triton_kernels, "INVERSE_COLUMNS", 2)  # fewer than a group's outputs
    alone = spin_pool(spectra, pairs, inverse, block.conv1.bias, "ieee", norm)
    assert _relative(alone, norm(direct)) < 1e-5
    with pytest.raises(ValueError, match="GroupNorm of 1 groups"):
        spin_pool(spectra, pairs, inverse, block.conv1.bias, "ieee", torch.nn.GroupNorm(1, mid))
    with pytest.raises(ValueError, match="paired_kernels makes"):  # not transposed
        spin_pool(spectra, pairs.transpose(-1, -2), inverse, block.conv1.bias, "ieee")


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("envelope", [False, True])
@pytest.mark.usefixtures("spectra_product")
def test_force_centric_forward_equals_the_pytorch_path(device, envelope, monkeypatch):
    """A whole force-centric forward (the small fixture checkpoint, a 17-atom O/Pt(100) slab),
    with and without the envelope's weighted grids: energy and forces as the PyTorch path's
    to float32 rounding, every fused path taken (the kernels' calls counted), and the model
    given to ``with_triton_kernels`` is left as it was.  In the interpreter with large tiles
    (its cost is per program; the default tiles are the tests above)."""
    model = _small_force_centric(device, monkeypatch, envelope=envelope).eval()
    fused = with_triton_kernels(model)
    assert all(
        m.triton_precision is None
        for m in model.modules()
        if isinstance(m, EmbeddingBlock | SpinConvBlock | MessageBlock | SpinConv | DistanceBlock)
    )
    calls = collections.Counter()
    for name in KERNEL_FUNCTIONS:
        kernel = getattr(triton_kernels, name)

        def counted(*args, _kernel=kernel, _name=name, **kwargs):
            norm = args[5] if _name == "spin_pool" and len(args) > 5 else kwargs.get("norm")
            fused_into = "addend" if kwargs.get("addend") is not None else ""
            calls[_name, fused_into + ("norm" if norm is not None else "")] += 1
            return _kernel(*args, **kwargs)

        monkeypatch.setattr(triton_kernels, name, counted)
    atoms = ocp_structures()["o_pt100"]
    batch = Batch.from_atoms(atoms, cutoff=model.cutoff).to(device, torch.float32)
    with torch.no_grad():
        reference, out = model(batch), fused(batch)
    assert _relative(out["energy"], reference["energy"]) < 1e-5
    assert _relative(out["forces"], reference["forces"]) < 1e-5
    # every fused path was taken: one distance basis, the model's two distance layers, two
    # per message block (the second with the residual), a mixture of experts and its two
    # layers per embedding block (two per message block, the model's, the energy block's, two
    # in the force block), the splat factors of the message and the force grids, each spin
    # convolution with its GroupNorm
    blocks = len(model.message_blocks)
    mixtures = 2 * blocks + 4
    assert calls == {
        ("basis_linear", ""): 1,
        ("linear", ""): 2 + blocks + 2 * mixtures,
        ("linear", "addend"): blocks,
        ("mixture_of_experts", ""): mixtures,
        ("splat_directions", ""): 2,
        ("spin_spectra", ""): blocks + 1,
        ("spin_pool", "norm"): blocks + 1,
    }


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_random_rotations_with_the_kernels(device, monkeypatch):
    """OCP's random force-block rotations (per atom, drawn each forward): the fused force
    grids (each atom's own frames, by the splat kernels) give the PyTorch path's forces for
    the same draw, where another draw moves them by order one."""
    model = _small_force_centric(device, monkeypatch).eval()
    if device == "cpu":  # the interpreter runs the one-product spectra (their own tests) slowly
        monkeypatch.setattr(triton_kernels, "SPECTRA_ONE_PRODUCT", False)
    model.random_rotations = True
    fused = with_triton_kernels(model)
    calls = []
    kernel = triton_kernels.splat_directions
    monkeypatch.setattr(
        triton_kernels, "splat_directions", lambda *a: calls.append(len(a[0])) or kernel(*a)
    )
    batch = Batch.from_atoms(ocp_structures()["co_cu111"], cutoff=model.cutoff)
    batch = batch.to(device, torch.float32)
    with torch.no_grad():
        forces = []
        for seed, copy_ in ((0, model), (0, fused), (1, model)):
            torch.manual_seed(seed)
            forces.append(copy_(batch)["forces"])
    assert _relative(forces[1], forces[0]) < 1e-5
    assert _relative(forces[2], forces[0]) > 0.1
    # the message grids (one per kept edge) and the force grids (3 axes x rotations x atoms)
    # by the kernels, in the fused forward
    assert len(calls) == 2 and 0 < calls[0] <= batch.n_edges
    assert calls[1] == 3 * model.num_rand_rotations * batch.n_atoms


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_basis_linear_is_the_gaussian_basis_and_its_layer(device):
    """The distance block's Gaussian basis (OCP's ``GaussianSmearing``, float32 coefficient)
    and linear layer in one kernel, the basis never stored: the two modules' numbers in
    float64 to float32 rounding (41 distances, 37 Gaussians -> 19: partial tiles); centres
    that do not match the layer are refused."""
    torch.manual_seed(7)
    expansion = GaussianSmearing(0.0, 6.0, 37, 2.0).to(device)
    layer = torch.nn.Linear(37, 19).to(device)
    distances = torch.rand(41, device=device) * 7.0
    with torch.no_grad():
        out = basis_linear(distances, expansion.offset, expansion.coeff, layer.weight, layer.bias)
        basis = copy.deepcopy(expansion).double()(distances.double())
        expected = copy.deepcopy(layer).double()(basis)
    assert out.shape == (41, 19)
    assert _relative(out.double(), expected) < 1e-5
    with pytest.raises(ValueError, match="centres for a layer of 37 inputs"):
        basis_linear(distances, expansion.offset[:-1], 1.0, layer.weight, layer.bias)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_splat_directions_are_the_splat_factors_of_the_projected_directions(device):
    """The grid positions of each grid's neighbor directions straight from the frames (the
    projection and the positions in two passes beside ``atan2`` and ``asin``): the PyTorch
    path's ``splat_factors`` of the einsum-projected directions, for directions on the
    poles, within the pole's radius and just outside, beyond the sphere (a frame a little
    longer than a rotation: the sine clamped), exactly on grid lines (axis directions in
    identity frames), and padding (31 x 7 entries: a partial program).  In Triton's
    interpreter the same numbers to the bit; on CUDA (Triton fuses multiply-adds, PyTorch
    divides by a number through its reciprocal) the same splat, a position on a grid line
    possibly the neighbor cell's edge.  Wrong dtypes and shapes refused."""
    torch.manual_seed(8)
    n, width, n_values, lat, long = 31, 7, 40, 5, 6
    frames = torch.linalg.qr(torch.randn(n, 3, 3, dtype=torch.float64))[0]
    frames[27:] = torch.eye(3, dtype=torch.float64)
    unit = torch.nn.functional.normalize(torch.randn(n_values, 3, dtype=torch.float64), dim=1)
    # reader 0 of grid g: its frame's own +-x axis (a pole) or, for g >= 20, near one
    sign = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).to(torch.float64).unsqueeze(1)
    tilt = torch.zeros(n, 3, dtype=torch.float64)
    tilt[20:26] = 1e-7 * frames[20:26, 1]  # inside the pole's radius (1e-6)
    tilt[26:] = 1e-6 * (frames[26:, 1] + frames[26:, 2])  # outside
    poles = torch.nn.functional.normalize(sign * frames[:, 0] + tilt, dim=1)
    axes = torch.tensor([[0, 0, 1], [0, 0, -1], [0, 1, 0], [0, -1, 0]], dtype=torch.float64)
    unit = torch.cat([unit, poles, axes])
    frames[26, 0] *= 1.0 + 1e-6  # p0 just above 1, off the pole
    index = torch.randint(0, n_values + 1, (n, width))
    index[index == n_values] = len(unit)  # padding
    index[:, 0] = n_values + torch.arange(n)
    index[27:, 1] = n_values + n + torch.arange(4)  # on grid lines (column 3 or 0, row 2)
    frames, unit, index = frames.to(device), unit.to(device), index.to(device)
    rows = RowIndex(index, len(unit))
    column, fraction, row, rise = splat_directions(frames, unit, index, lat, long, POLE_EPS2)
    projected = torch.einsum("nkc,njc->njk", frames, rows.gather(unit))
    assert (projected[26, 0, 0] > 1.0) and (projected[27:, 1, 0] == 0.0).all()
    valid = index < len(unit)
    longitude, latitude = splat_factors(projected, valid, lat, long, torch.float32)
    if device == "cpu":
        for ours, theirs in zip(
            (column, fraction, row, rise),
            (longitude.column, longitude.fraction, latitude.row, latitude.fraction),
            strict=True,
        ):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    ours_long = LongitudeSplat(column, fraction, longitude.table)
    ours_lat = LatitudeSplat(row, rise, valid, lat)
    torch.testing.assert_close(ours_long.phase, longitude.phase, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours_lat.rows, latitude.rows, rtol=0, atol=1e-6)
    assert (rise[~valid] == 0).all() and (~valid).any()
    with pytest.raises(ValueError, match="30 frames for 31 rows"):
        splat_directions(frames[:-1], unit, index, lat, long, POLE_EPS2)
    with pytest.raises(TypeError, match="float64"):
        splat_directions(frames.float(), unit, index, lat, long, POLE_EPS2)


def test_tf32_rounding_is_to_the_nearest_tf32_number():
    """``tf32_rounded`` keeps 10 mantissa bits, the nearest such number (within half a unit
    of the last kept bit, 2^-11 relative), ties away from zero (as the GPU's ``cvt.rna``);
    zeros, infinities and exact TF32 numbers unchanged, NaN kept (whatever its bits: a GPU's
    0x7FFFFFFF would carry into the sign)."""
    x = torch.randn(10_000) * torch.logspace(-20, 20, 10_000)
    rounded = tf32_rounded(x)
    assert not (rounded.view(torch.int32) & 0x1FFF).any()
    assert ((rounded - x).abs() <= x.abs() * 2.0**-11).all()
    ties = torch.tensor([1.0 + 2.0**-11, -(1.0 + 2.0**-11), 1.0 + 3 * 2.0**-11])
    expected = torch.tensor([1.0 + 2.0**-10, -(1.0 + 2.0**-10), 1.0 + 2 * 2.0**-10])
    torch.testing.assert_close(tf32_rounded(ties), expected, rtol=0, atol=0)
    exact = torch.tensor([0.0, -0.0, 1.5, float("inf"), -float("inf")])
    torch.testing.assert_close(tf32_rounded(exact), exact, rtol=0, atol=0)
    nans = torch.tensor([0x7FFFFFFF, -1, 0x7FC00000], dtype=torch.int32).view(torch.float32)
    assert tf32_rounded(nans).isnan().all()


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy's inf-inf
def test_tf32_split_is_two_tf32_numbers_that_sum_to_x(device):
    """``tf32_split``: the nearest TF32 number, then the TF32 number nearest the rest (both
    with their 13 low bits zero), together ``x`` within 2^-22 of it; an infinity's rest is
    zero, a NaN stays NaN."""
    x = torch.randn(5000) * torch.logspace(-20, 20, 5000)
    x[:4] = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0])
    x = x.to(device)
    split = tf32_split(x)
    assert split.shape == (2, 5000)
    high, low = split
    torch.testing.assert_close(high, tf32_rounded(x), rtol=0, atol=0, equal_nan=True)
    finite = x.isfinite()
    rest = x[finite] - high[finite]  # exact
    torch.testing.assert_close(low[finite], tf32_rounded(rest), rtol=0, atol=0)
    assert not (split[:, finite].contiguous().view(torch.int32) & 0x1FFF).any()
    assert ((rest - low[finite]).abs() <= x[finite].abs() * 2.0**-22).all()
    assert (low[:2] == 0).all() and high[2].isnan() and low[2].isnan()


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_tf32x3_products_with_the_second_factor_split_in_memory(device, split, monkeypatch):
    """``tf32x3`` products whose second factor is split once per call (``SPLIT_WEIGHTS``,
    ``tf32_split``) or by Triton at every step: float64's numbers to float32 rounding in the
    linear layer, the basis layer, the mixture of experts and the frequency products (a part
    of either factor dropped or read from the wrong place is ~1e-4 off); one split per call
    where it is on, none where it is off."""
    monkeypatch.setattr(triton_kernels, "SPLIT_WEIGHTS", split)
    shapes = []

    def counted(x: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(x.shape))
        return tf32_split(x)

    monkeypatch.setattr(triton_kernels, "tf32_split", counted)
    torch.manual_seed(8)
    x, weight, bias = (torch.randn(*s, device=device) for s in ((37, 45), (19, 45), (19,)))
    expected = x.double() @ weight.double().T + bias.double()
    assert _relative(linear(x, weight, bias).double(), expected) < 1e-5

    expansion = GaussianSmearing(0.0, 6.0, 45, 2.0).to(device)
    distances = torch.rand(37, device=device) * 7.0
    out = basis_linear(distances, expansion.offset, expansion.coeff, weight, bias)
    basis = copy.deepcopy(expansion).double()(distances.double())
    assert _relative(out.double(), basis @ weight.double().T + bias.double()) < 1e-5

    mixture = torch.softmax(torch.randn(37, 3, device=device), dim=1)
    experts = torch.randn(3 * 17, 45, device=device)
    out = mixture_of_experts(x, experts, bias.new_zeros(3 * 17), mixture)
    pre = (x.double() @ experts.double().T).view(37, 3, 17)
    expected = (mixture.double().unsqueeze(-1) * torch.nn.functional.silu(pre)).sum(1)
    assert _relative(out.double(), expected) < 1e-5

    long, lat = 7, 5
    block = SpinConvBlock(16, 24, lat, long).to(device)
    index, longitude, latitude = _grids(device, 13, 9, 20, lat, long)
    with torch.no_grad():
        block.conv1.bias.normal_()
        spectra = spin_spectra(torch.randn(20, 16, device=device), index, longitude, latitude, 2)
        real, imag, inverse = block.kernel_spectra()
        pairs = paired_kernels(real, imag, long)
        out = spin_pool(spectra, pairs, inverse, block.conv1.bias, "tf32x3")
        expected = spin_pool(spectra, pairs, inverse, block.conv1.bias, "ieee")
    assert _relative(out, expected) < 1e-5
    assert shapes == ([(19, 45), (19, 45), (51, 45), tuple(pairs.shape)] if split else [])


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy's inf-inf
def test_tf32x3_product_of_an_infinite_or_nan_input(device, split, monkeypatch):
    """An infinite input makes a ``tf32x3`` product +-inf, as a float32 product, not NaN: it has
    no rest, and its TF32 part does not meet the weights' zero rests (TF32 weights here); a NaN
    makes it NaN, also one whose bits round to infinity (0x7F800001) or to zero (0x7FFFFFFF,
    the GPU's NaN).  Triton's own ``tf32x3`` (not :data:`SPLIT_WEIGHTS`) compiled for a GPU
    rounds the first to infinity, as its TF32 part, and gives +-inf: not finite still (the
    interpreter keeps the NaN)."""
    monkeypatch.setattr(triton_kernels, "SPLIT_WEIGHTS", split)
    torch.manual_seed(9)
    x = torch.randn(6, 24, device=device)
    x[0, 3], x[2, 7] = float("inf"), -float("inf")
    x[4, 5] = torch.tensor(0x7F800001, dtype=torch.int32).view(torch.float32)
    x[5, 1] = torch.tensor(0x7FFFFFFF, dtype=torch.int32).view(torch.float32)
    weight, bias = tf32_rounded(torch.randn(19, 24, device=device)), torch.randn(19, device=device)
    out = linear(x, weight, bias)
    expected = x.double() @ weight.double().T + bias.double()
    assert out[[0, 2]].isinf().all() and out[5].isnan().all()
    hardware_rounding = not split and device == "cuda"
    assert (out[4].isinf() | out[4].isnan()).all() if hardware_rounding else out[4].isnan().all()
    torch.testing.assert_close(out[[0, 2]], expected[[0, 2]].float(), rtol=0, atol=0)
    assert _relative(out[[1, 3]].double(), expected[[1, 3]]) < 1e-5


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy's inf-inf
@pytest.mark.usefixtures("spectra_product")
def test_spectra_of_an_infinite_or_nan_value_are_not_finite(device, split, monkeypatch):
    """A grid that reads an infinite or NaN value (NaNs whose bits round to infinity or zero
    among them) has ``tf32x3`` spectra that are not finite wherever the full-float32 ones are
    not (never a finite number made of a NaN); the other grids' spectra finite and the same;
    37 values per grid, two chunks."""
    monkeypatch.setattr(triton_kernels, "SPLIT_WEIGHTS", split)
    torch.manual_seed(11)
    index, longitude, latitude = _grids(device, 9, 37, 400, 5, 6)
    values = torch.randn(400, 16, device=device)
    bits = torch.tensor([0x7F800001, 0x7FFFFFFF, -1], dtype=torch.int32)  # -1: 0xFFFFFFFF
    values[[3, 7, 11], 2] = bits.view(torch.float32).to(device)
    values[15, 9] = float("inf")
    full = spin_spectra(values, index, longitude, latitude, 2, "ieee")
    split_spectra = spin_spectra(values, index, longitude, latitude, 2, "tf32x3")
    reads_them = torch.isin(index, torch.tensor([3, 7, 11, 15], device=device)).any(dim=1)
    assert reads_them.any() and not reads_them.all()
    bad, good = full[:, :, reads_them], full[:, :, ~reads_them]
    assert not bad.isfinite().all() and good.isfinite().all()
    assert not split_spectra[:, :, reads_them][~bad.isfinite()].isfinite().any()
    assert _relative(split_spectra[:, :, ~reads_them], good) < 1e-5


@contextlib.contextmanager
def _gpu_tf32_products() -> Iterator[None]:
    """Triton's interpreter with the GPU's TF32 products: a ``tf32`` dot drops its inputs'
    low 13 bits (the interpreter multiplies every ``tl.dot`` in full float32)."""
    if not INTERPRETED:
        pytest.skip("the emulation patches Triton's interpreter (TRITON_INTERPRET is not set)")
    from triton._C.libtriton import ir
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    plain = InterpreterBuilder.create_dot
    if list(inspect.signature(plain).parameters)[:5] != ["self", "a", "b", "d", "input_precision"]:
        pytest.skip("this Triton's interpreter has another dot signature")

    def truncated(x: np.ndarray) -> np.ndarray:
        return (x.astype(np.float32).view(np.int32) & np.int32(-8192)).view(np.float32)

    def create_dot(self, a, b, d, input_precision, *args):
        if input_precision != ir.INPUT_PRECISION.TF32:
            return plain(self, a, b, d, input_precision, *args)
        product = np.matmul(truncated(a.data), truncated(b.data), dtype=np.float32)
        return TensorHandle(product + d.data, d.dtype.scalar)

    InterpreterBuilder.create_dot = create_dot
    try:
        yield
    finally:
        InterpreterBuilder.create_dot = plain


@pytest.mark.usefixtures("spectra_product")
def test_tf32x3_products_leave_the_tensor_cores_nothing_to_drop():
    """With the GPU's TF32 products emulated (each input's low 13 bits dropped), the
    ``tf32x3`` products of weights keep float32's accuracy: the first factor's TF32 part
    rounded, its rest and the weights' two TF32 parts exact in TF32 (< 2e-6 of float64, where
    one ``tf32`` product is > 1e-4 off: the emulation is on) in the linear layer, the basis
    layer, the mixture of experts, the frequency products and the spectra (latitude factors
    split once for every longitude, two chunks of values; these two against ``ieee``'s, full
    float32 in the interpreter)."""
    torch.manual_seed(10)
    x, weight, bias = (torch.randn(*s) for s in ((37, 45), (19, 45), (19,)))
    expansion = GaussianSmearing(0.0, 6.0, 45, 2.0)
    distances = torch.rand(37) * 7.0
    mixture = torch.softmax(torch.randn(37, 3), dim=1)
    experts = torch.randn(3 * 17, 45)
    basis = copy.deepcopy(expansion).double()(distances.double())
    pre = (x.double() @ experts.double().T).view(37, 3, 17)
    products = {
        "linear": (
            lambda precision: linear(x, weight, bias, precision=precision),
            x.double() @ weight.double().T + bias.double(),
        ),
        "basis_linear": (
            lambda precision: basis_linear(
                distances, expansion.offset, expansion.coeff, weight, bias, precision
            ),
            basis @ weight.double().T + bias.double(),
        ),
        "mixture_of_experts": (
            lambda precision: mixture_of_experts(x, experts, torch.zeros(51), mixture, precision),
            (mixture.double().unsqueeze(-1) * torch.nn.functional.silu(pre)).sum(1),
        ),
    }
    long, lat = 7, 5
    block = SpinConvBlock(16, 24, lat, long)
    index, longitude, latitude = _grids("cpu", 13, 9, 20, lat, long)
    with torch.no_grad(), _gpu_tf32_products():
        block.conv1.bias.normal_()
        spectra = spin_spectra(torch.randn(20, 16), index, longitude, latitude, 2, "ieee")
        real, imag, inverse = block.kernel_spectra()
        pairs = paired_kernels(real, imag, long)
        products["spin_pool"] = (
            lambda precision: spin_pool(spectra, pairs, inverse, block.conv1.bias, precision),
            spin_pool(spectra, pairs, inverse, block.conv1.bias, "ieee").double(),  # float32
        )
        grids = _grids("cpu", 7, 37, 20, lat, long)  # two chunks of values, 32 + 16
        values = torch.randn(20, 16)
        products["spin_spectra"] = (
            lambda precision: spin_spectra(values, *grids, 2, precision),
            spin_spectra(values, *grids, 2, "ieee").double(),
        )
        for name, (product, expected) in products.items():
            assert _relative(product("tf32x3").double(), expected) < 2e-6, name
            assert _relative(product("tf32").double(), expected) > 1e-4, name


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.usefixtures("spectra_product")
def test_rounded_kernel_outputs_are_tf32_numbers(device):
    """A linear layer's and the spectra's ``rounded`` outputs (the inputs of the ``mixed``
    precision's TF32 products) are their plain outputs rounded by ``tf32_rounded``."""
    torch.manual_seed(6)
    x, weight, bias = (torch.randn(*s, device=device) for s in ((37, 24), (20, 24), (20,)))
    bias[3] = torch.tensor(0x7FFFFFFF, dtype=torch.int32).view(torch.float32)  # a GPU's NaN
    plain = linear(x, weight, bias, True, "ieee")
    rounded = linear(x, weight, bias, True, "ieee", rounded=True)
    torch.testing.assert_close(rounded, tf32_rounded(plain), rtol=0, atol=0, equal_nan=True)
    assert rounded[:, 3].isnan().all()
    index, longitude, latitude = _grids(device, 9, 37, 12, 5, 6)  # two chunks of values
    values = torch.randn(12, 16, device=device)
    spectra = spin_spectra(values, index, longitude, latitude, 2, "ieee")
    torch.testing.assert_close(
        spin_spectra(values, index, longitude, latitude, 2, "ieee", rounded=True),
        tf32_rounded(spectra),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_mixed_precision_rounds_the_bulk_products_and_keeps_the_energy_block(device, monkeypatch):
    """``with_triton_kernels(model, "mixed")``: every block but the energy block computes its
    bulk products on TF32-rounded inputs (here in the interpreter, where the products are
    otherwise exact, the only difference to float32: forces move by about 1e-4 relative),
    the energy block keeps ``tf32x3``."""
    model = _small_force_centric(device, monkeypatch).eval()
    if device == "cpu":  # the interpreter runs the one-product spectra (their own tests) slowly
        monkeypatch.setattr(triton_kernels, "SPECTRA_ONE_PRODUCT", False)
    mixed = with_triton_kernels(model, "mixed")
    assert mixed.energyembeddingblock.triton_precision == "tf32x3"
    assert mixed.force_output_block.block1.triton_precision == "mixed"
    assert mixed.message_blocks[0].spinconvblock.triton_precision == "mixed"
    batch = Batch.from_atoms(ocp_structures()["o_pt100"], cutoff=model.cutoff)
    batch = batch.to(device, torch.float32)
    with torch.no_grad():
        reference, out = model(batch), mixed(batch)
    assert 1e-6 < _relative(out["forces"], reference["forces"]) < 1e-2
    assert _relative(out["energy"], reference["energy"]) < 1e-3


def test_whole_forward_with_the_gpus_tf32_products(monkeypatch):
    """With the GPU's TF32 products emulated (inputs' low 13 bits dropped), a whole
    force-centric forward with the ``tf32x3`` kernels still equals the PyTorch path to float32
    rounding: no product is left to one plain TF32 product, which the same emulation shows
    ``tf32`` to be (1e-4 or more off)."""
    model = _small_force_centric("cpu", monkeypatch).eval()
    batch = Batch.from_atoms(ocp_structures()["o_pt100"], cutoff=model.cutoff)
    with torch.no_grad():
        reference = model(batch)
        with _gpu_tf32_products():
            split = with_triton_kernels(model)(batch)
            truncated = with_triton_kernels(model, "tf32")(batch)
    for key in ("energy", "forces"):
        assert _relative(split[key], reference[key]) < 2e-6
        assert _relative(truncated[key], reference[key]) > 1e-4


def test_autograd_and_float64_keep_the_pytorch_path(monkeypatch):
    """The kernels have no backward and take float32: with autograd recording (training, an
    energy-centric model's forces) or in float64, a block with kernels enabled computes with
    PyTorch's operators and never calls the kernel, also where only the block's weights
    need a gradient."""
    torch.manual_seed(5)
    block = EmbeddingBlock(8, 4, 16, 3, 10)
    block.triton_precision = "tf32x3"
    elements = torch.randint(1, 10, (5,))
    x = torch.randn(5, 8, requires_grad=True)
    called = []
    monkeypatch.setattr(triton_kernels, "mixture_of_experts", lambda *args: called.append(args))
    block(x, elements, elements).sum().backward()
    with torch.no_grad():
        block.double()(x.detach().double(), elements, elements)
    assert not called and x.grad is not None


def test_blocks_whose_weights_need_a_gradient_keep_the_pytorch_path(monkeypatch):
    """Training: a block's inputs may need no gradient (a force-centric model's distances
    and geometry, the output of a frozen block) while its own weights do; every fused block
    then computes with PyTorch's operators (no kernel called) and the gradient reaches its
    weights: the mixture of experts, the distance block (without pair scalings: its
    distances need no gradient), the distance layers with their residual sum, and the spin
    convolution (only its GroupNorm's scale and shift trainable)."""
    for name in KERNEL_FUNCTIONS:
        monkeypatch.setattr(triton_kernels, name, lambda *args, **kwargs: 1 / 0)
    torch.manual_seed(9)
    model = with_triton_kernels(
        SpinConv(hidden_channels=16, mid_hidden_channels=16, scale_distances=False)
    )
    elements = torch.randint(1, 10, (6,))
    model.dist_block(torch.rand(6) + 1.0, elements, elements).sum().backward()
    assert model.dist_block.fc1.weight.grad is not None
    assert model.dist_block.fc1.bias.grad is not None
    x, x_dist = torch.randn(6, 16), torch.randn(6, 16)
    swish_layers(x_dist, model.distfc1, model.distfc2, "tf32x3", addend=x).sum().backward()
    assert model.distfc1.weight.grad is not None
    model.embeddingblock2(x, elements, elements).sum().backward()
    assert model.embeddingblock2.fc2.weight.grad is not None
    block = model.message_blocks[0].spinconvblock
    block.requires_grad_(False)
    block.GroupNorm.requires_grad_(True)
    index, longitude, latitude = _grids("cpu", 5, 4, 6, block.lat, block.long)
    projections = SphereProjections(RowIndex(index, 6), longitude, latitude)
    projections.spin_convolution(block, x).sum().backward()
    assert block.GroupNorm.weight.grad is not None


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_fine_tuning_a_copy_with_kernels_and_a_frozen_block(device, monkeypatch):
    """Fine-tuning the small force-centric model with its distance block frozen: the frozen
    block's outputs need no gradient (the fused basis kernel computes them), every later
    block trains through PyTorch's operators, and every trainable weight gets the gradient
    the plain model's copy gets (to float32 rounding)."""
    model = _small_force_centric(device, monkeypatch)
    model.dist_block.requires_grad_(False)
    fused = with_triton_kernels(model)
    batch = Batch.from_atoms(ocp_structures()["o_pt100"], cutoff=model.cutoff)
    batch = batch.to(device, torch.float32)
    for copy_ in (model, fused):
        out = copy_(batch)
        (out["energy"].sum() + out["forces"].square().sum()).backward()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any(name.startswith("dist_block") for name in trainable)
    fused_parameters = dict(fused.named_parameters())
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            gradient = fused_parameters[name].grad
            assert gradient is not None, name
            if parameter.grad.abs().max() > 0:
                assert _relative(gradient, parameter.grad) < 1e-4, name


def test_with_triton_kernels_refuses_what_it_cannot_do():
    """An unknown precision and a model without SpinConv blocks are refused by name; a kernel
    asked to run on a CPU tensor outside Triton's interpreter says what it needs."""
    with pytest.raises(ValueError, match="precision must be one of"):
        with_triton_kernels(SpinConv(), precision="fp16")
    with pytest.raises(ValueError, match="holds no SpinConv blocks"):
        with_triton_kernels(torch.nn.Linear(2, 2))
    compiled = JITFunction(triton_kernels._mixture_kernel.fn)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        triton_kernels._launcher(compiled, torch.zeros(1))
    with pytest.raises(TypeError, match="float32"):
        mixture_of_experts(
            torch.zeros(2, 2, dtype=torch.float64),
            torch.zeros(2, 2),
            torch.zeros(2),
            torch.ones(2, 1),
        )


@CUDA
def test_cuda_graph_replay_with_the_kernels():
    """The calculator's CUDA-graph replay (warm-up, capture, replays with a skin) runs the
    fused kernels inside the graph: forces after two moves equal the plain PyTorch
    calculator's to float32 rounding.  (CUDA only: on the CPU the interpreter takes ~20 s for
    this, and the fixed-shape forward there is the plain forward's modules, tested above.)"""
    from ase.build import add_adsorbate, fcc111, molecule

    from forcecalc.calculator import load_calculator
    from forcecalc.checkpoint import load_checkpoint

    potential = load_checkpoint("spinconv-fc", device="cuda", dtype="float32")
    slab = fcc111("Cu", (2, 2, 3), vacuum=6.0)
    slab.pbc = True
    add_adsorbate(slab, molecule("CO"), 1.8, "fcc")
    slab.rattle(0.05, seed=0)
    plain, graphed = slab.copy(), slab.copy()
    plain.calc = load_calculator(potential)
    graphed.calc = load_calculator(with_triton_kernels(potential), cuda_graph=True, skin=1.0)
    for step in range(3):
        reference, forces = plain.get_forces(), graphed.get_forces()
        assert _relative(torch.from_numpy(forces), torch.from_numpy(reference)) < 1e-5, step
        move = np.random.default_rng(step).normal(scale=0.02, size=(len(slab), 3))
        plain.positions += move
        graphed.positions += move
    assert graphed.calc.replay.captures == 1
