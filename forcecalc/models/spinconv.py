"""SpinConv (Shuaibi et al., "Rotation Invariant Graph Neural Networks using Spin Convolutions",
2021), re-implemented to load the Open Catalyst Project's checkpoints strictly and reproduce the
original's numbers (OCP ``ocpmodels/models/spinconv.py``, commit e7a8745eb).

The network, in OCP's terms (parameter names are OCP's, so ``load_state_dict(strict=True)``
accepts an OCP state_dict once its ``module.`` prefix is removed):

* Messages live on directed edges ``e = (s -> t)`` (``edge_index[:, e] = (s, t)``, vector
  ``v_e = pos[s] - pos[t] + shift``).  They start from the Gaussian-expanded, per element pair
  rescaled distance (``dist_block``), two dense layers and an element-conditioned mixture of
  experts (``embeddingblock2``).
* Each message block projects, for every edge ``e``, the messages of the edges *into its
  source* ``s`` onto a latitude/longitude grid around ``s`` in ``e``'s frame (polar axis
  ``v_e / |v_e|``, the roll fixed by the distance-weighted mean neighbor vector of ``t``),
  bilinearly splatted; a circular convolution along longitude, average-pooled over all
  longitudinal shifts, makes the result invariant to the roll ("spin convolution").
* Energy: messages summed onto their targets, divided by ``max_num_neighbors / 2 + 1``, a last
  mixture of experts per atom, summed per system.
* Forces, ``force_estimator="random"`` (force-centric): for each atom and each of ``R``
  rotations ``R_r``, the messages into the atom are projected in the three frames whose polar
  axes are the rows of ``R_r``; the force block predicts the force component along each axis,
  and the forces are ``mean_r R_r^T (f_x, f_y, f_z)``.  ``force_estimator="grad"``
  (energy-centric): forces are an energy gradient (see ``forces`` below).

Conventions this implementation fixes (see ``shared/fixtures/ocp/README.md``):

* **The pole.**  In an edge's frame the edge's own reverse message lies exactly on the polar
  axis, where the longitude ``atan2(y, z)`` is undefined; the original took it from the signs of
  rounding noise.  Here a projected direction with ``y**2 + z**2 < 1e-12`` gets ``y = z = +0``
  (longitude ``atan2(+0, +0) = 0``) and the latitude exactly ``+-pi/2`` (the original's
  ``asin`` of a rounded ``+-1`` adds up to ~1e-8 rad of noise there; the difference is ~1e-8 of
  the outputs).  All projection geometry (edge frames, projected directions, latitudes and
  longitudes, bins and splat weights) is computed in float64 even for a float32 model, so the
  threshold is 1e-12 in both precisions: the reverse edge is *exactly* ``-v_e`` (computed from
  the same numbers with the opposite sign), so it lands ~1e-32 from the axis, far below the
  threshold, while a genuine neighbor must be within 1e-6 rad of the axis to count as on it.
  Cost: about ``n_edges * max_num_neighbors`` float64 dot products, trig functions and index
  computations: 15 ms of the 630 ms single-thread float32 forward of a 38-atom slab with the
  published hyperparameters (2-3%); on a GPU this elementwise work is negligible.
* **Max-neighbor ties.**  The graph is cut with
  :func:`~forcecalc.graph.neighbors.max_neighbors_mask` (each atom keeps its ``max_neighbors``
  closest neighbors plus every neighbor tied with the last one within 1e-5 Å), in place of
  OCP's sort-order dependent cut and ``_filter_edges`` (a no-op after OCP's strict cut: every
  remaining edge is within its target's closest ``k``).
* The Gaussian width uses OCP's float32 product ``basis_width_scalar * (offset[1] -
  offset[0])`` (:class:`~forcecalc.models.blocks.GaussianSmearing`).

With these, float64 energies and forces equal the original's float64 references to ~1e-8
relative on every structure without a tie at the max-neighbor cut.  Not changed, because the
checkpoints depend on it: the original adds 1e-4 to each component of the mean neighbor vector
that fixes the roll of an edge frame, so the model is not exactly rotation invariant (energies
~1e-7 relative for slabs, conservative forces up to ~2e-4 relative on bulk cells; up to ~1e-3
for a symmetric site such as CH4's carbon, whose mean neighbor vector vanishes, and steep
there: that helper direction moves by ~1e4 rad per Å of the mean vector); a force-centric
model gives an isolated atom the force block's bias.

* **Edges along the helper.**  The roll is ``cross(x, helper)``, undefined for an edge along
  its helper direction.  That happens at every centrosymmetric site (the mean vector vanishes,
  the helper is ``(1, 1, 1) / sqrt(3)``) for edges along a cube diagonal: bcc and B2 crystals,
  CH4 as ASE builds it.  The original then takes the roll from rounding noise amplified 1e7
  times (its ``+1e-7`` normalisation): energies change by up to 0.03 eV and force-centric
  forces by 70% when atoms move by 1e-9 Å, and conservative forces reach 1e7 eV/Å.  Here an
  edge within 1e-6 rad of its helper (``|cross|**2 < 1e-12``, as for the pole), or within 1e-3
  rad where the helper is hypersensitive (``|mean + 1e-4| < 1e-3`` Å, :data:`HELPER_SENSITIVE`:
  near a centrosymmetric site), takes its roll from the mean vector plus
  :data:`ROLL_FALLBACK` instead, a direction 1e-6 rad or more away from it wherever the mean
  vector is smaller than ~100 Å.  The wider cone covers atoms up to ~1e-8 Å off the symmetric
  site (a perfect crystal read back from a file with 8 decimals: conservative forces 0.36
  instead of 4.8e3 eV/Å with the shipped ``spinconv-ec``); no rattled fixture edge comes within
  3e-3 rad of its helper, and edges along a helper that is not hypersensitive (an atom whose
  mean vector points along one of its bonds, 1e-4 rad from it) keep the original's roll.
  Elsewhere the numbers are the original's.  Like the original's frame, this one jumps where
  an edge crosses into the cone, and between ~1e-7 and ~1e-4 Å off the site the original's
  steepness remains (the roll follows the direction of a 1e-7-1e-4 Å vector: conservative
  forces of 10-400 eV/Å with ``spinconv-ec``, see the README).  No continuous roll can agree
  with the original outside a cone around the helper (the original's roll winds once around
  it), so a cone and its edge are the price of keeping the checkpoints' numbers.

Forces of the energy-centric model (``forces``):

* ``"compat"`` (OCP's definition): the original computes the bilinear splat weights under
  ``no_grad``, so its forces are minus the gradient of the energy through the distance
  features only.  No stress: the same partial derivative with respect to strain is not the
  energy's strain derivative (off by up to half of a component, with signs flipped), and OCP
  never defined one, so ``compute_stress`` asks for ``"conservative"``.
* ``"conservative"``: the full ``-dE/dx`` (and ``(1/V) dE/dstrain``), for MD.  On the pole the
  projection is the convention's constant (longitude 0, latitude ``+-pi/2``) with zero
  derivative: the reverse edge (and a periodic image collinear with the edge) stays on the
  pole for every configuration, so its projection is constant and the derivative is exactly
  zero.  ``atan2`` and ``asin`` are evaluated at safe arguments there (``torch.where`` on
  their inputs), otherwise autograd would form ``0/0`` (``d atan2`` at ``(+0, +0)``) and
  ``1/0`` (``d asin`` at ``+-1``), or rounding noise amplified by ~1e32.  Off the pole the
  derivative is finite (``y**2 + z**2 >= 1e-12`` bounds ``1/sqrt(1 - p0**2)`` by 1e6) and the
  splat is piecewise bilinear, continuous across bin edges and the longitude wrap, so the
  energy is continuous with a piecewise smooth gradient.  Its gradient jumps across a bin
  edge, and a symmetric structure puts directions exactly on bin edges, where rounding picks
  the side: there two evaluations that round differently (another padding or summation
  order, another device) can give forces that differ by O(1) eV/Å (1e-13 Å off the
  symmetric O/Cu(100) test slab, the small test model's forces move by 4.6 eV/Å).  The
  model itself remains discontinuous where a *genuine* neighbor crosses a pole (its
  longitude jumps), a property of the architecture; near such configurations conservative
  forces vary steeply.

The spin convolution is exact but evaluated in Fourier space along the longitude: the splat
weights are built directly as the real DFT of the bilinear splat (no grid in space), the
circular ``Conv1d`` becomes a real matrix product per frequency and group, and a real inverse
DFT (a matrix product) returns the ``long`` shifted outputs that are pooled.  This takes about
five times fewer operations than ``nn.Conv1d`` with circular padding (the pooled output
averages over all longitudinal shifts, so the padding's alignment does not matter), uses no
scatter (deterministic on any device) and runs in chunks of grids (bounded memory).

Speed (this 2-core AMD EPYC, float32, no autograd, SpinConv-All's hyperparameters, 66-atom
Cu(111) + CO slab): 598 ms on two threads (the original: 828 ms), 860 ms on one.  Matrix
products are 43 GFLOP of that forward (29 of them the mixtures of experts, which evaluate all
eight 256-wide experts on every edge), about 450 ms at this core's ~95 GFLOP/s: the rest is
gathers, copies and elementwise work.  Two threads on a busy machine can be far
slower than one (spinning OpenMP threads); set ``torch.set_num_threads`` accordingly.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from forcecalc.graph.batch import Batch
from forcecalc.graph.gather import RowIndex, pad_rows, take_rows
from forcecalc.graph.neighbors import edge_vectors, kept_edges_mask
from forcecalc.models.blocks import GaussianSmearing
from forcecalc.replay import candidate_inputs, padded_size, padded_table, room
from forcecalc.warning import warn

_Constant = TypeVar("_Constant")

#: A projected unit direction with ``y**2 + z**2`` below this lies on the pole (float64).
POLE_EPS2 = 1e-12
#: Near a centrosymmetric site (the helper's vector ``mean + 1e-4`` shorter than
#: ``HELPER_SENSITIVE`` Å, so the helper turns by more than 1e3 rad per Å), an edge whose
#: direction has ``|cross(edge, helper)|**2`` below ``HELPER_EPS2`` lies along its frame's helper
#: (float64); elsewhere below ``POLE_EPS2`` (see the module docstring).
HELPER_EPS2 = 1e-6
HELPER_SENSITIVE = 1e-3
#: Added to the mean neighbor vector, in place of OCP's +1e-4 per component, to fix the roll of
#: an edge frame whose edge lies along OCP's helper direction (see the module docstring).
ROLL_FALLBACK = (2e-4, 0.0, 1e-4)
#: Half-width of the uniform initialization of the per-element-pair distance scaling.
PAIR_INIT = 1e-4
#: Seed of the default fixed set of force-block rotations.
ROTATION_SEED = 0
#: Working set (bytes) of one chunk of grids in the spin convolutions, on the CPU.  Small on
#: purpose: a chunk's temporaries stay in cache, and temporaries above glibc's mmap threshold
#: are fresh pages on every call (faulting them in once cost a third of the forward time).
#: 8 MiB was the fastest of 2-32 MiB for SpinConv-All and the shipped models (38- and 66-atom
#: slabs, one thread; 12% faster than 32 MiB for SpinConv-All).
CHUNK_BYTES = 1 << 23
#: The same on a GPU (the caching allocator reuses memory; larger chunks use it better).
CHUNK_BYTES_CUDA = 1 << 30
#: Splat weights of all grids are kept across the message blocks up to this size (bytes), on a
#: GPU or with autograd (see :meth:`SphereProjections.spin_convolution`).
WEIGHT_CACHE_BYTES = 1 << 28
#: Width of the element-pair mixture of experts (OCP's ``num_embedding_basis``).
NUM_EXPERTS = 8
#: Rows per chunk of a mixture of experts on the CPU (see :meth:`EmbeddingBlock.forward`).
MOE_CHUNK_ROWS = 256

_SUPPORTED_SPHERE = ("fullconv",)


class EmbeddingBlock(nn.Module):
    """Element-conditioned mixture of experts (OCP's ``EmbeddingBlock``).

    ``x -> fc3(sum_k w_k(Z_a, Z_b) * act(fc2(act(fc1(x))))[k])`` with ``NUM_EXPERTS`` experts of
    width ``mid`` and weights ``w = softmax(embed_fc1([emb_a(Z_a), emb_b(Z_b)]))``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        mid_channels: int,
        embedding_size: int,
        max_num_elements: int,
    ) -> None:
        super().__init__()
        self.mid_channels = mid_channels
        self.act = F.silu  # Swish, x * sigmoid(x), in one pass
        self.fc1 = nn.Linear(in_channels, mid_channels)
        self.fc2 = nn.Linear(mid_channels, NUM_EXPERTS * mid_channels)
        self.fc3 = nn.Linear(mid_channels, out_channels)
        self.source_embedding = nn.Embedding(max_num_elements, embedding_size)
        self.target_embedding = nn.Embedding(max_num_elements, embedding_size)
        nn.init.uniform_(self.source_embedding.weight, -1e-4, 1e-4)
        nn.init.uniform_(self.target_embedding.weight, -1e-4, 1e-4)
        self.embed_fc1 = nn.Linear(2 * embedding_size, NUM_EXPERTS)
        #: Precision of the fused Triton kernels, None for PyTorch's operators (see
        #: :func:`~forcecalc.models.triton_kernels.with_triton_kernels`).
        self.triton_precision: str | None = None

    def forward(self, x: Tensor, source_element: Tensor, target_element: Tensor) -> Tensor:
        """``[n, in] -> [n, out]``; elements ``[n]`` int64.  On the CPU without autograd, in
        chunks of ``MOE_CHUNK_ROWS`` rows: the ``[rows, NUM_EXPERTS * mid]`` expert outputs of a
        chunk stay in cache between the matrix product, the Swish and the mixing (a third faster
        than one pass for SpinConv-All's 256-wide experts).  With autograd the expert outputs
        are kept for the backward pass anyway, and chunks only add work (force-centric training
        step 5% slower)."""
        recording = torch.is_grad_enabled() and x.requires_grad
        mixture = self._expert_weights(source_element, target_element)
        if uses_kernels(self.triton_precision, x, self):
            return self._fused_mixture(x, mixture)
        if x.is_cuda or recording or len(x) <= MOE_CHUNK_ROWS:
            return self._mixture(x, mixture)
        chunks = zip(x.split(MOE_CHUNK_ROWS), mixture.split(MOE_CHUNK_ROWS), strict=True)
        return torch.cat([self._mixture(*chunk) for chunk in chunks])

    def _mixture(self, x: Tensor, mixture: Tensor) -> Tensor:
        experts = self.act(self.fc2(self.act(self.fc1(x))))
        experts = experts.view(-1, NUM_EXPERTS, self.mid_channels)
        mixed = torch.bmm(mixture.unsqueeze(1), experts).squeeze(1)
        return self.fc3(mixed)

    def _fused_mixture(self, x: Tensor, mixture: Tensor) -> Tensor:
        from forcecalc.models.triton_kernels import (
            linear,
            mixture_of_experts,
            product_precisions,
            tf32_rounded,
        )

        layers, bulk, rounded = product_precisions(self.triton_precision)
        h = linear(x, self.fc1.weight, self.fc1.bias, True, layers, rounded=rounded)
        experts = tf32_rounded(self.fc2.weight) if rounded else self.fc2.weight
        mixed = mixture_of_experts(h, experts, self.fc2.bias, mixture, bulk)
        return linear(mixed, self.fc3.weight, self.fc3.bias, precision=layers)

    def _expert_weights(self, source_element: Tensor, target_element: Tensor) -> Tensor:
        """``[n, NUM_EXPERTS]``: the softmax of the element pair's embeddings (elements ``[n]``
        below the embeddings' size, which the models check first).  Where the rows
        outnumber the element pairs (batches), they are computed once per pair and looked up:
        the same numbers (up to the rounding of the product) without two embedding lookups, a
        concatenation and a product per row (the lookups alone took 1.4 ms of an 89 ms forward
        of 64 x 66 atoms with the fused kernels on an H100)."""
        if source_element.shape != target_element.shape:
            raise ValueError(
                f"source and target elements differ in shape: {tuple(source_element.shape)} "
                f"and {tuple(target_element.shape)}"
            )
        n_elements = self.source_embedding.num_embeddings
        if len(source_element) <= n_elements * n_elements:
            return self._pair_weights(source_element, target_element)
        elements = torch.arange(n_elements, device=source_element.device)
        table = self._pair_weights(
            elements.repeat_interleave(n_elements), elements.repeat(n_elements)
        )  # [n_elements ** 2, NUM_EXPERTS], row source * n_elements + target
        return take_rows(table, source_element * n_elements + target_element)

    def _pair_weights(self, source_element: Tensor, target_element: Tensor) -> Tensor:
        pair = torch.cat(
            [self.source_embedding(source_element), self.target_embedding(target_element)], dim=1
        )
        return torch.softmax(self.embed_fc1(pair), dim=1)


class DistanceBlock(nn.Module):
    """Gaussian expansion of the (per element pair rescaled) distance, then a linear layer.

    With ``scale_distances``: ``d' = scalar_max ** (2 sigmoid(w_s) - 1) * d + w_o``, with
    ``w_s, w_o`` looked up at ``Z_source * max_num_elements + Z_target``.
    """

    def __init__(
        self,
        num_basis: int,
        out_channels: int,
        max_num_elements: int,
        scalar_max: float,
        expansion: GaussianSmearing,
        scale_distances: bool,
    ) -> None:
        super().__init__()
        self.max_num_elements = max_num_elements
        self.log_scalar_max = math.log(scalar_max)
        self.distance_expansion = expansion
        self.scale_distances = scale_distances
        if scale_distances:
            self.dist_scalar = nn.Embedding(max_num_elements**2, 1)
            self.dist_offset = nn.Embedding(max_num_elements**2, 1)
            nn.init.uniform_(self.dist_scalar.weight, -PAIR_INIT, PAIR_INIT)
            nn.init.uniform_(self.dist_offset.weight, -PAIR_INIT, PAIR_INIT)
        self.fc1 = nn.Linear(num_basis, out_channels)
        #: Precision of the fused Triton kernel of the basis and ``fc1``, None for PyTorch's
        #: operators (see :func:`~forcecalc.models.triton_kernels.with_triton_kernels`).
        self.triton_precision: str | None = None

    @property
    def trainable_pairs(self) -> bool:
        """Whether the pair scalings exist and train (not frozen while fine-tuning others)."""
        return (
            self.scale_distances
            and self.dist_scalar.weight.requires_grad
            and self.dist_offset.weight.requires_grad
        )

    def pairs_with_gradient(self) -> Tensor:
        """``[max_num_elements**2]`` bool: the ordered element pairs whose scaling has a
        non-zero gradient now (after a backward pass: the pairs of the batch's edges)."""
        weights = (self.dist_scalar.weight, self.dist_offset.weight)
        touched = torch.zeros(len(weights[0]), dtype=torch.bool, device=weights[0].device)
        for weight in weights:
            if weight.grad is not None:
                touched |= (weight.grad != 0).any(dim=1)
        return touched

    @torch.no_grad()
    def fill_untrained_pairs(self, trained: Tensor | None = None) -> list[tuple[int, int]]:
        """Give the ordered element pairs ``(a, b)``, ``a != b``, that training never saw the
        scaling of the reverse pair ``(b, a)`` if that was trained, else the mean of the self
        pairs ``(a, a)`` and ``(b, b)``; returns the pairs filled.

        A pair's scaling only learns from edges between those two elements, so a pair absent
        from the training data keeps its initialization (scale 1, offset 0), which the rest of
        the trained model has not seen for any pair; alloys of held-out metal pairs then get
        forces no better than the median baseline.  "Never trained" means both parameters
        still inside the initialization range ``[-PAIR_INIT, PAIR_INIT]`` (an Adam step moves
        a trained one well outside, and a checkpoint's trained pairs lie outside) and, where
        ``trained`` (``[max_num_elements**2]`` bool, the pairs that had a gradient in this
        run: :meth:`pairs_with_gradient`) is given, not listed there (a short or gentle run
        leaves trained pairs inside the range).  Self pairs must be trained to serve.
        Idempotent.  For models we train (``forcecalc train`` applies it to the files it
        writes), never on loading a checkpoint: a loaded model computes what it was given.
        Tables that do not train (frozen while fine-tuning other blocks) are left as they are.
        """
        if not self.trainable_pairs:
            return []  # frozen tables (fine-tuning other blocks) keep their values
        n = self.max_num_elements
        scalar = self.dist_scalar.weight.view(n, n)
        offset = self.dist_offset.weight.view(n, n)
        untrained = (scalar.abs() <= PAIR_INIT) & (offset.abs() <= PAIR_INIT)
        if trained is not None:
            untrained &= ~trained.to(untrained.device).view(n, n)
        trained_self = ~untrained.diagonal()
        reverse = ~untrained.T
        fill = untrained & (reverse | (trained_self.unsqueeze(0) & trained_self.unsqueeze(1)))
        fill.fill_diagonal_(False)
        for table in (scalar, offset):
            diagonal = table.diagonal()
            mean = 0.5 * (diagonal.unsqueeze(0) + diagonal.unsqueeze(1))
            table.copy_(torch.where(fill, torch.where(reverse, table.T, mean), table))
        return [(int(a), int(b)) for a, b in fill.nonzero().tolist()]

    def forward(self, distances: Tensor, source_element: Tensor, target_element: Tensor) -> Tensor:
        """``[n_edges] -> [n_edges, out]``."""
        if self.scale_distances:
            pair = source_element * self.max_num_elements + target_element
            exponent = 2.0 * torch.sigmoid(self.dist_scalar(pair).view(-1)) - 1.0
            scale = torch.exp(self.log_scalar_max * exponent)
            distances = scale * distances + self.dist_offset(pair).view(-1)
        if not uses_kernels(self.triton_precision, distances, self):
            return self.fc1(self.distance_expansion(distances))
        from forcecalc.models.triton_kernels import basis_linear, product_precisions

        layers, _, _ = product_precisions(self.triton_precision)
        expansion = self.distance_expansion
        return basis_linear(
            distances, expansion.offset, expansion.coeff, self.fc1.weight, self.fc1.bias, layers
        )


class SpinConvBlock(nn.Module):
    """Spin convolution of projected grids, given as their packed longitude spectra: ``[n, C,
    long, lat] -> [n, mid]`` (the ``long`` real numbers of the real DFT along the longitude in
    the order of :func:`_packed_frequencies`; see :func:`splat_factors`).

    Equal to OCP's ``Conv1d(C*lat -> mid, kernel long, groups C//8, circular padding)`` over
    the longitude (input channel ``c * lat + latitude``), Swish, average over the ``long``
    longitudinal positions, then ``GroupNorm(C//8, mid)``.  Evaluated in Fourier space (see the
    module docstring); ``conv1`` holds the weights with OCP's name and shape.
    """

    def __init__(self, in_channels: int, mid_channels: int, lat: int, long: int) -> None:
        super().__init__()
        if in_channels % 8:
            raise ValueError(f"hidden_channels must be a multiple of 8, got {in_channels}")
        self.in_channels = in_channels
        self.mid_channels = mid_channels
        self.lat = lat
        self.long = long
        self.groups = in_channels // 8
        if mid_channels % self.groups:
            raise ValueError(
                f"mid_hidden_channels ({mid_channels}) must be a multiple of "
                f"hidden_channels // 8 ({self.groups})"
            )
        self.conv1 = nn.Conv1d(
            in_channels * lat,
            mid_channels,
            long,
            groups=self.groups,
            padding=long // 2,
            padding_mode="circular",
        )
        self.GroupNorm = nn.GroupNorm(self.groups, mid_channels)
        #: Precision of the fused Triton kernels, None for PyTorch's operators (see
        #: :func:`~forcecalc.models.triton_kernels.with_triton_kernels`).
        self.triton_precision: str | None = None
        # The DFT matrices by (dtype, device): constants, built once (about 25 small operations
        # per spin convolution otherwise, a fifth of a batch-1 forward's launches on CUDA).
        self._dft: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor, Tensor]] = {}

    def dft_matrices(
        self, dtype: torch.dtype, device: torch.device
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``cos`` and ``sin`` ``[long, long // 2 + 1]`` of :func:`_dft_matrices` and the
        inverse DFT ``[long, long]`` of :func:`_inverse_dft_matrix`, built once per dtype and
        device (as ordinary tensors without history, also under ``torch.inference_mode``)."""
        return _kept_constant(
            self._dft,
            dtype,
            device,
            lambda: (
                *_dft_matrices(self.long, dtype, device),
                _inverse_dft_matrix(self.long, dtype, device),
            ),
        )

    def kernel_spectra(self) -> tuple[Tensor, Tensor, Tensor]:
        """``conj(DFT(kernel)) = real + i imag`` at every frequency ``0 <= f <= long / 2``, per
        group, as real matrices ``[frequencies, groups, (c, latitude), mid/groups]``, and the
        inverse DFT of a packed spectrum ``[long, long]`` (:func:`_inverse_dft_matrix`)."""
        weight = self.conv1.weight
        groups, per_group = self.groups, self.in_channels // self.groups
        cos, sin, inverse = self.dft_matrices(weight.dtype, weight.device)
        weight = weight.view(groups, -1, per_group, self.lat, self.long)
        # conj(DFT(w))[f] = sum_k w[k] (cos + i sin)(2 pi f k / long) = real + i imag
        shape = (self.long // 2 + 1, groups, per_group * self.lat, -1)
        # [f, g, (c, lat), mid/g], laid out for the products (a strided kernel would be copied
        # by every product, once per chunk of grids)
        real = (weight @ cos).permute(4, 0, 2, 3, 1).reshape(shape).contiguous()
        imag = (weight @ sin).permute(4, 0, 2, 3, 1).reshape(shape).contiguous()
        return real, imag, inverse

    def kernels(self) -> tuple[Tensor, ...]:
        """Multiplication by ``conj(DFT(kernel))`` (:meth:`kernel_spectra`) ready for Gauss's
        three-product complex multiplication: ``(real, imag - real, real + imag)`` at the
        frequencies with an imaginary part (``0 < f < long / 2``), and ``real`` alone at
        ``f = 0`` and, for an even ``long``, at ``f = long / 2``, where the spectra of real grids
        are real (the packed spectrum has no imaginary part there); last, the inverse DFT.
        Computed once per spin convolution, not per chunk of grids."""
        real, imag, inverse = self.kernel_spectra()
        middle = _frequency_slice(_middle_frequencies(self.long))
        edge = _frequency_slice(_edge_frequencies(self.long))
        real_mid, imag_mid = real[middle], imag[middle]
        edge_real = real[edge].contiguous()
        return edge_real, real_mid, imag_mid - real_mid, real_mid + imag_mid, inverse

    def forward(self, spectrum: Tensor, kernels: tuple[Tensor, ...] | None = None) -> Tensor:
        """``kernels``: :meth:`kernels`, if already computed (they depend on the weights only)."""
        n = spectrum.shape[0]
        groups, long = self.groups, self.long
        per_group = self.in_channels // groups
        mid_per_group = self.mid_channels // groups
        # -> [long, groups, n, (c, latitude)]; (c, latitude) is OCP's channel order.  Frequency
        # outermost: each frequency range is contiguous, so its products with the kernels are
        # one batched matrix product over (frequency, group) without a copy.
        spectrum = spectrum.view(n, groups, per_group, long, self.lat)
        spectrum = spectrum.permute(3, 1, 0, 2, 4).reshape(long, groups, n, per_group * self.lat)
        n_edge, n_middle = len(_edge_frequencies(long)), len(_middle_frequencies(long))
        edge, re, im = spectrum.split([n_edge, n_middle, n_middle])
        # Circular cross-correlation out[o] = sum_j x[j] w[j - o] <=> X * conj(W) per frequency:
        # (a + ib)(c + id) = (k1 - k3) + i (k1 + k2) with k1 = (a + b) c, k2 = a (d - c),
        # k3 = b (c + d); then the real inverse DFT of the packed spectrum.
        edge_kernel, real, imag_minus_real, real_plus_imag, inverse = (
            self.kernels() if kernels is None else kernels
        )
        inverse = inverse.to(spectrum.dtype)  # [long, long]; bf16 under autocast
        inverse_edge, inverse_re, inverse_im = inverse.split([n_edge, n_middle, n_middle])

        def product(values: Tensor, kernel: Tensor) -> Tensor:
            # [f, g, n, K] x [f, g, K, M] -> [f, g * n * M]
            out = torch.matmul(values, kernel)
            return out.view(len(out), groups * n * mid_per_group)

        # the inverse DFT over the frequencies: [long, f] x [f, g * n * M] -> [long, g * n * M],
        # the convolution's bias added by the first product (no pass of its own)
        bias = self.conv1.bias.view(groups, 1, mid_per_group).expand(groups, n, mid_per_group)
        conv = torch.addmm(bias.reshape(1, -1), inverse_edge.T, product(edge, edge_kernel))
        if n_middle:
            k1 = product(re + im, real)
            k2 = product(re, imag_minus_real)
            k3 = product(im, real_plus_imag)
            conv = conv.addmm_(inverse_re.T, k1 - k3)
            conv = conv.addmm_(inverse_im.T, k1 + k2)
        conv = conv.view(long, groups, n, mid_per_group)
        pooled = F.silu(conv).mean(dim=0)  # [groups, n, mid/groups]
        return self.GroupNorm(pooled.transpose(0, 1).reshape(n, self.mid_channels))


class MessageBlock(nn.Module):
    """One interaction: spin convolution of the projected messages, mixture of experts, plus a
    distance term, Swish, mixture of experts back to the message width."""

    def __init__(
        self,
        hidden_channels: int,
        mid_channels: int,
        embedding_size: int,
        lat: int,
        long: int,
        max_num_elements: int,
    ) -> None:
        super().__init__()
        self.spinconvblock = SpinConvBlock(hidden_channels, mid_channels, lat, long)
        self.embeddingblock1 = EmbeddingBlock(
            mid_channels, mid_channels, mid_channels, embedding_size, max_num_elements
        )
        self.embeddingblock2 = EmbeddingBlock(
            mid_channels, hidden_channels, mid_channels, embedding_size, max_num_elements
        )
        self.distfc1 = nn.Linear(mid_channels, mid_channels)
        self.distfc2 = nn.Linear(mid_channels, mid_channels)
        #: Precision of the fused Triton kernels for the distance term, None for
        #: PyTorch's operators (see :func:`~forcecalc.models.triton_kernels.with_triton_kernels`).
        self.triton_precision: str | None = None

    def forward(
        self,
        x: Tensor,
        projections: SphereProjections,
        x_dist: Tensor,
        source_element: Tensor,
        target_element: Tensor,
    ) -> Tensor:
        """Messages ``x`` ``[n_edges, hidden]`` -> ``[n_edges, hidden]``: ``projections``
        holds one grid per edge (its target's other incoming messages in the edge's frame),
        ``x_dist`` ``[n_edges, mid]`` the distance features, elements ``[n_edges]`` int64."""
        x = projections.spin_convolution(self.spinconvblock, x)
        x = self.embeddingblock1(x, source_element, target_element)
        x = swish_layers(x_dist, self.distfc1, self.distfc2, self.triton_precision, addend=x)
        return self.embeddingblock2(x, source_element, target_element)


class ForceOutputBlock(nn.Module):
    """Force block: spin convolution of an atom's projected messages, two mixtures of experts
    (output channel 0 is the force component along the grid's polar axis)."""

    def __init__(
        self,
        hidden_channels: int,
        mid_channels: int,
        embedding_size: int,
        lat: int,
        long: int,
        max_num_elements: int,
    ) -> None:
        super().__init__()
        self.act = F.silu  # Swish, x * sigmoid(x), in one pass
        self.spinconvblock = SpinConvBlock(hidden_channels, mid_channels, lat, long)
        self.block1 = EmbeddingBlock(
            mid_channels, mid_channels, mid_channels, embedding_size, max_num_elements
        )
        self.block2 = EmbeddingBlock(
            mid_channels, 2, mid_channels, embedding_size, max_num_elements
        )

    def forward(self, x: Tensor, projections: SphereProjections, element: Tensor) -> Tensor:
        """Messages ``x`` ``[n_edges, hidden]`` -> ``[n_grids, 2]`` (channel 0: the force along
        each grid's polar axis): ``projections`` holds the force block's grids (an atom's
        incoming messages per axis and rotation), ``element`` ``[n_grids]`` int64 the atom's."""
        x = projections.spin_convolution(self.spinconvblock, x)
        x = self.act(self.block1(x, element, element))
        return self.block2(x, element, element)


def swish_layers(
    x: Tensor,
    first: nn.Linear,
    second: nn.Linear,
    triton_precision: str | None,
    addend: Tensor | None = None,
) -> Tensor:
    """``act(second(act(first(x))) + addend)`` ``[n, out]`` (Swish ``act``; ``addend`` ``[n,
    out]``, none if not given) from ``x`` ``[n, in]``: the distance features' two layers, by the
    fused linear kernel (the sum and Swish in its pass) where ``triton_precision`` asks for it
    and it applies (float32, no autograd recording)."""
    parts = (first, second) if addend is None else (first, second, addend)
    if not uses_kernels(triton_precision, x, *parts):
        out = second(F.silu(first(x)))
        return F.silu(out if addend is None else addend + out)
    from forcecalc.models.triton_kernels import linear, product_precisions

    layers, _, _ = product_precisions(triton_precision)
    hidden = linear(x, first.weight, first.bias, True, layers)
    return linear(hidden, second.weight, second.bias, True, layers, addend=addend)


#: Whether :func:`warn_max_neighbor_cut` warns (see :func:`no_max_neighbor_cut_warnings`).
_WARN_CUT: ContextVar[bool] = ContextVar("warn_max_neighbor_cut", default=True)


@contextlib.contextmanager
def no_max_neighbor_cut_warnings() -> Iterator[None]:
    """Within the block (in this thread or task), :func:`warn_max_neighbor_cut` warns of
    nothing: for forward passes on structures the user did not give (the batched engine's
    compressed copies, on which it measures its memory model), whose cut is none of theirs.
    Python's warning filters are left alone (changing them makes the warnings shown once show
    again)."""
    token = _WARN_CUT.set(False)
    try:
        yield
    finally:
        _WARN_CUT.reset(token)


def warn_max_neighbor_cut(max_neighbors: int | None, cutoff: float) -> None:
    """The warning of a model with the envelope whose max-neighbor rule cut pairs within
    the cutoff (from the forward, or from the calculator for the fixed-shape forward's
    ``cut`` output), unless :func:`no_max_neighbor_cut_warnings` is in effect."""
    if not _WARN_CUT.get():
        return
    warn(
        f"an atom has more than {max_neighbors} neighbors within {cutoff:g} Å: the "
        "max-neighbor rule cuts there, so this model's energy and forces are not continuous "
        "as atoms move (its envelope makes them smooth only without a cut)"
    )


class SpinConv(nn.Module):
    """SpinConv with OCP's hyperparameters (``model_attributes``) and parameter names.

    Args (OCP's, with OCP's defaults):
        hidden_channels: width of the edge messages (multiple of 8).
        mid_hidden_channels: width inside the blocks.
        num_interactions: number of message blocks.
        num_basis_functions, basis_width_scalar: Gaussian distance basis on ``[0, cutoff]``.
        max_num_neighbors: the max-neighbor rule of the graph (initial value of
            :attr:`max_neighbors`) and the energy readout divisor ``max_num_neighbors/2 + 1``.
        sphere_size_lat, sphere_size_long: the projection grid.
        cutoff: graph radius (Å).
        distance_block_scalar_max, max_num_elements, embedding_size: see OCP.
        sphere_message, output_message: only ``"fullconv"`` is implemented.
        force_estimator: ``"random"`` (force-centric) or ``"grad"`` (energy-centric).
        regress_forces: return forces (``False``: energy only).
        num_rand_rotations: rotations averaged by the force block.
        scale_distances: per element pair distance rescaling.
        num_atoms, bond_feat_dim, num_targets, otf_graph, use_pbc, show_timing_info,
        model_ref_number, readout, lmax: accepted and ignored (the graph is the caller's, with
            each system's pbc; ``lmax`` only matters for the unimplemented ``"rotspharmwd"``).

    Our options:
        rotations: force-centric only. ``None``: a fixed set of ``num_rand_rotations``
            rotations (seeded, drawn as OCP draws them), the same for every atom, so forces
            are a deterministic function of the positions; ``"random"``: fresh random rotations
            per atom and per rotation at every call (the original's behaviour); a tensor
            ``[R, 3, 3]``: these rotations for every atom.  Held in the buffer ``rotations``
            (not in the state_dict) unless ``"random"``.
        forces: energy-centric only. ``"compat"`` (OCP's definition, gradient through the
            distances only) or ``"conservative"`` (the full ``-dE/dx``); see the module
            docstring.
        envelope: not in OCP (its checkpoints have none). Weight every edge's message by the
            cosine cutoff ``(cos(pi d / cutoff) + 1) / 2`` wherever it leaves its edge: in the
            energy readout and in every grid it is projected onto. An edge then enters and
            leaves the graph smoothly, so the energy is continuous with continuous forces
            as atoms cross the cutoff (what MD needs), provided the max-neighbor rule never
            cuts: choose ``max_num_neighbors`` above the largest number of neighbors within
            the cutoff.

    Attributes:
        cutoff: graph radius; the batch must hold at least every pair within it (it may hold
            more, e.g. built at ``cutoff + skin`` and without a max-neighbor cut).
        max_neighbors: the max-neighbor rule applied in :meth:`forward` (may be changed).
        energy_gradient: True for the energy-centric model (forces from the energy's
            gradient, by autograd).
        defines_stress: True for the energy-centric model with ``forces="conservative"``
            (``compat`` forces are a partial derivative, and so would its stress be).
    """

    def __init__(
        self,
        num_atoms: int | None = None,
        bond_feat_dim: int | None = None,
        num_targets: int = 1,
        use_pbc: bool = True,
        regress_forces: bool = True,
        otf_graph: bool = False,
        hidden_channels: int = 32,
        mid_hidden_channels: int = 200,
        num_interactions: int = 1,
        num_basis_functions: int = 200,
        basis_width_scalar: float = 1.0,
        max_num_neighbors: int = 20,
        sphere_size_lat: int = 15,
        sphere_size_long: int = 9,
        cutoff: float = 10.0,
        distance_block_scalar_max: float = 2.0,
        max_num_elements: int = 90,
        embedding_size: int = 32,
        show_timing_info: bool = False,
        sphere_message: str = "fullconv",
        output_message: str = "fullconv",
        lmax: int | bool = False,
        force_estimator: str = "random",
        model_ref_number: int = 0,
        readout: str = "add",
        num_rand_rotations: int = 5,
        scale_distances: bool = True,
        rotations: str | Tensor | None = None,
        forces: str = "compat",
        envelope: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("sphere_message", sphere_message), ("output_message", output_message)):
            if value not in _SUPPORTED_SPHERE:
                raise ValueError(
                    f"{name}={value!r} is not implemented (only 'fullconv'; OCP's published "
                    "SpinConv checkpoints use 'fullconv')"
                )
        if force_estimator not in ("random", "grad"):
            raise ValueError(f"force_estimator must be 'random' or 'grad', got {force_estimator!r}")
        if forces not in ("compat", "conservative"):
            raise ValueError(f"forces must be 'compat' or 'conservative', got {forces!r}")
        if forces == "conservative" and force_estimator != "grad":
            raise ValueError(
                "forces='conservative' needs an energy-centric model (force_estimator='grad'); "
                "a force-centric SpinConv predicts forces directly"
            )
        if sphere_size_lat < 2 or sphere_size_long < 1:
            raise ValueError(
                f"sphere size must be at least 2 x 1, got {sphere_size_lat} x {sphere_size_long}"
            )
        if max_num_neighbors < 1 or num_rand_rotations < 1:
            raise ValueError("max_num_neighbors and num_rand_rotations must be positive")

        self.cutoff = float(cutoff)
        self.max_num_neighbors = int(max_num_neighbors)
        self.max_neighbors = int(max_num_neighbors)
        self.hidden_channels = hidden_channels
        self.mid_hidden_channels = mid_hidden_channels
        self.lat = sphere_size_lat
        self.long = sphere_size_long
        self.max_num_elements = max_num_elements
        self.force_estimator = force_estimator
        self.regress_forces = regress_forces
        self.forces = forces
        self.envelope = envelope
        self.energy_gradient = force_estimator == "grad"
        self.num_rand_rotations = num_rand_rotations

        self.distance_expansion_forces = GaussianSmearing(
            0.0, self.cutoff, num_basis_functions, basis_width_scalar
        )
        self.embeddingblock2 = EmbeddingBlock(
            mid_hidden_channels,
            hidden_channels,
            mid_hidden_channels,
            embedding_size,
            max_num_elements,
        )
        self.distfc1 = nn.Linear(mid_hidden_channels, mid_hidden_channels)
        self.distfc2 = nn.Linear(mid_hidden_channels, mid_hidden_channels)
        self.dist_block = DistanceBlock(
            num_basis_functions,
            mid_hidden_channels,
            max_num_elements,
            distance_block_scalar_max,
            self.distance_expansion_forces,
            scale_distances,
        )
        self.message_blocks = nn.ModuleList(
            MessageBlock(
                hidden_channels,
                mid_hidden_channels,
                embedding_size,
                sphere_size_lat,
                sphere_size_long,
                max_num_elements,
            )
            for _ in range(num_interactions)
        )
        self.energyembeddingblock = EmbeddingBlock(
            hidden_channels, 1, mid_hidden_channels, embedding_size, max_num_elements
        )
        self.random_rotations = False
        #: Precision of the fused Triton kernels for the distance features' layers, None for
        #: PyTorch's operators (see :func:`~forcecalc.models.triton_kernels.with_triton_kernels`).
        self.triton_precision: str | None = None
        # The splat DFT table by (dtype, device): a constant (see splat_table).
        self._splat_tables: dict[tuple[torch.dtype, torch.device], Tensor] = {}
        if force_estimator == "random":
            self.force_output_block = ForceOutputBlock(
                hidden_channels,
                mid_hidden_channels,
                embedding_size,
                sphere_size_lat,
                sphere_size_long,
                max_num_elements,
            )
            self._init_rotations(rotations)
        elif rotations is not None:
            raise ValueError(
                "rotations only apply to a force-centric model (force_estimator='random')"
            )

    def splat_table(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """:func:`_splat_dft_table` in ``dtype`` on ``device``, built once per dtype and device
        (as an ordinary tensor without history, also under ``torch.inference_mode``)."""
        return _kept_constant(
            self._splat_tables, dtype, device, lambda: _splat_dft_table(self.long, device).to(dtype)
        )

    def _init_rotations(self, rotations: str | Tensor | None) -> None:
        if isinstance(rotations, str):
            if rotations != "random":
                raise ValueError(f"rotations must be None, 'random' or a tensor, got {rotations!r}")
            self.random_rotations = True
            return
        if rotations is None:
            generator = torch.Generator().manual_seed(ROTATION_SEED)
            matrices = ocp_random_rotations(self.num_rand_rotations, generator=generator)
        else:
            matrices = torch.as_tensor(rotations, dtype=torch.float64)
            if matrices.ndim != 3 or matrices.shape[1:] != (3, 3) or len(matrices) == 0:
                raise ValueError(f"rotations must have shape [R, 3, 3], got {list(matrices.shape)}")
            eye = torch.eye(3, dtype=torch.float64)
            if not torch.allclose(matrices @ matrices.transpose(1, 2), eye, atol=1e-5):
                raise ValueError("rotations must be orthogonal matrices")
            if (torch.linalg.det(matrices) < 0).any():
                raise ValueError(
                    "rotations must be proper rotations (determinant +1), not reflections: "
                    "a mirrored frame changes the forces"
                )
        self.register_buffer("rotations", matrices, persistent=False)

    # ------------------------------------------------------------------ forward

    def forward(self, batch: Batch, compute_stress: bool = False) -> dict[str, Tensor]:
        """Raw (normalized) outputs for a batch.

        Returns:
            ``"energy"`` ``[n_systems]``, ``"forces"`` ``[n_atoms, 3]`` (unless
            ``regress_forces`` is False) and, with ``compute_stress`` (energy-centric only),
            ``"stress"`` ``[n_systems, 3, 3]`` = ``(1/V) dE/dstrain`` (energy units per Å^3;
            not finite for a system whose cell has zero volume).
        """
        if compute_stress and not self.defines_stress:
            raise ValueError(
                "stress needs forces='conservative': OCP's compat forces differentiate the "
                "energy through the distance features only, and a stress so made is not the "
                "strain derivative of the energy"
                if self.energy_gradient
                else "stress is only defined for an energy-centric SpinConv "
                "(force_estimator='grad'); this model predicts forces directly"
            )
        gradient = self.force_estimator == "grad" and (self.regress_forces or compute_stress)
        if gradient:
            _check_autograd_available()
        self._check_elements(batch.numbers)
        with torch.set_grad_enabled(gradient or torch.is_grad_enabled()):
            positions, cell = batch.positions, batch.cell
            leaf, strain = positions, None
            if gradient:
                if not leaf.requires_grad:
                    leaf = leaf.detach().requires_grad_(True)
                positions = leaf
                if compute_stress:
                    # r' = r (I + strain), cell' = cell (I + strain): dE/dstrain at 0.
                    strain = torch.zeros_like(cell).requires_grad_(True)
                    positions = leaf + torch.einsum("ni,nij->nj", leaf, strain[batch.system_idx])
                    cell = cell + torch.bmm(cell, strain)
            energy, forces = self._energy_and_direct_forces(batch, positions, cell)
            out = {"energy": energy}
            if gradient:
                inputs = [leaf] if strain is None else [leaf, strain]
                grads = torch.autograd.grad(
                    energy.sum(), inputs, create_graph=self.training, allow_unused=True
                )
                if self.regress_forces:
                    out["forces"] = -_zeros_if_none(grads[0], leaf)
                if strain is not None:
                    # Symmetric part: the response to a (symmetric) strain.  The antisymmetric
                    # part, a torque, is ~1e-7 relative: OCP's frames are not exactly rotation
                    # invariant (the +1e-4 added to the mean neighbor vector).
                    derivative = _zeros_if_none(grads[1], strain)
                    derivative = 0.5 * (derivative + derivative.transpose(1, 2))
                    volume = torch.linalg.det(batch.cell).abs().view(-1, 1, 1)
                    out["stress"] = derivative / volume
            elif self.regress_forces:
                out["forces"] = forces
        return out

    def supported_numbers(self) -> list[int]:
        """Atomic numbers the model's embedding tables cover: ``1 .. max_num_elements - 1``."""
        return list(range(1, self.max_num_elements))

    def _check_elements(self, numbers: Tensor) -> None:
        if len(numbers) and not bool(((numbers >= 1) & (numbers < self.max_num_elements)).all()):
            bad = numbers[(numbers < 1) | (numbers >= self.max_num_elements)].unique()
            raise ValueError(
                f"atomic numbers {bad.tolist()} are outside this model's range "
                f"1..{self.max_num_elements - 1}"
            )

    def _energy_and_direct_forces(
        self, batch: Batch, positions: Tensor, cell: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        vectors = batch.edge_vectors(positions.to(torch.float64), cell.to(torch.float64))
        edge_index, vectors = self._select_edges(batch.edge_index, vectors, batch.n_atoms)
        source, target = edge_index
        target_rows = RowIndex(target, batch.n_atoms)
        incoming_rows = target_rows.transposed()
        return self._evaluate(
            batch.numbers,
            source,
            vectors,
            target_rows,
            incoming_rows,
            RowIndex(incoming_rows.index[source], len(vectors)),
            RowIndex(batch.system_idx, batch.n_systems),
        )

    def _evaluate(
        self,
        numbers: Tensor,
        source: Tensor,
        vectors: Tensor,
        target_rows: RowIndex,
        incoming_rows: RowIndex,
        neighbor_rows: RowIndex,
        systems: RowIndex,
    ) -> tuple[Tensor, Tensor | None]:
        """Energies ``[n_systems]`` and direct forces ``[n_atoms, 3]`` (``None`` for an
        energy-centric model) of a graph given by its tables; no data-dependent shapes.

        Args:
            numbers: ``[n_atoms]`` atomic numbers.
            source: ``[n_edges]`` source atom of every edge.
            vectors: ``[n_edges, 3]`` float64 edge vectors (differentiable).
            target_rows: the target atom of every edge, ``[n_edges]`` into ``n_atoms`` rows.
            incoming_rows: the edges into every atom, ``[n_atoms, width]`` into ``n_edges``
                rows (increasing edge index, padded with ``n_edges``).  An edge that no atom
                lists is evaluated and never read: padding of a fixed-shape graph.
            neighbor_rows: the edges into every edge's source, ``[n_edges, width]`` into
                ``n_edges`` rows (``incoming_rows.index[source]``).
            systems: the system of every atom, ``[n_atoms]`` into ``n_systems`` rows.
        """
        dtype = self.distfc1.weight.dtype
        target = target_rows.index
        distances = torch.linalg.norm(vectors, dim=1)
        source_element, target_element = numbers[source], numbers[target]

        x_dist = self.dist_block(distances.to(dtype), source_element, target_element)
        x = swish_layers(x_dist, self.distfc1, self.distfc2, self.triton_precision)
        x = self.embeddingblock2(x, source_element, target_element)

        differentiable = self.forces == "conservative"
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            unit = vectors / distances.unsqueeze(1)
            frames = _edge_frames(vectors, distances, unit, target_rows, incoming_rows, self.cutoff)
            table = self.splat_table(dtype, unit.device)
            if self._fused_geometry(dtype):
                projections = SphereProjections.from_frames(
                    frames, unit, neighbor_rows, self.lat, table
                )
            else:
                projected = torch.einsum("ekc,ejc->ejk", frames, neighbor_rows.gather(unit))
                projections = SphereProjections.from_directions(
                    projected, neighbor_rows, self.lat, self.long, dtype, table
                )
        edge_weight = None
        if self.envelope:
            edge_weight = cosine_cutoff(distances, self.cutoff).to(dtype)
            projections = projections.weighted(neighbor_rows.gather(edge_weight))

        for index, block in enumerate(self.message_blocks):
            update = block(x, projections, x_dist, source_element, target_element)
            x = update if index == 0 else x + update

        messages = x if edge_weight is None else x * edge_weight.unsqueeze(1)
        per_atom = incoming_rows.gather(messages).sum(dim=1) / (self.max_num_neighbors / 2.0 + 1.0)
        atom_energy = self.energyembeddingblock(per_atom, numbers, numbers).view(-1)
        energy = systems.sum_by_row(atom_energy.to(dtype))

        forces = None
        if self.force_estimator == "random" and self.regress_forces:
            forces = self._direct_forces(
                x, unit.detach(), incoming_rows.index, numbers, edge_weight
            )
        return energy, forces

    def _fused_geometry(self, dtype: torch.dtype) -> bool:
        """Whether the grids' splat factors come from the fused Triton kernels (a float32
        model with the kernels, no autograd recording)."""
        return (
            self.triton_precision is not None
            and dtype == torch.float32
            and not torch.is_grad_enabled()
        )

    # ------------------------------------------------------------ fixed shapes

    @property
    def defines_stress(self) -> bool:
        """Whether the stress is the strain derivative of the energy (see the attributes)."""
        return self.energy_gradient and self.forces == "conservative"

    @property
    def fixed_shapes(self) -> bool:
        """Whether :meth:`fixed_shape_forward` is available (a model that regresses forces)."""
        return self.regress_forces

    def fixed_shape_inputs(
        self, batch: Batch, previous: dict[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """The inputs of :meth:`fixed_shape_forward`: the batch's edges as candidates (any
        superset of the graph, e.g. built at ``cutoff + skin``), with their tables, padded to
        sizes that change rarely; the selection itself (cutoff, max-neighbor rule) happens
        inside the fixed-shape forward.  So these inputs depend on the positions only through
        ``inputs["positions"]``: while the batch's edges stay the same, a caller may replace
        that entry alone (``positions.to(float64)`` of the moved atoms; see
        :meth:`forcecalc.checkpoint.Potential.moved`).  Host-synchronizing on CUDA; computed on
        ``batch``'s device.

        Sizes: the kept edges get room for ``E`` edges and ``W`` per atom, from the edges the
        rule keeps at these positions: ``W`` their largest number into an atom rounded up to a
        multiple of 8, ``E`` their number plus an eighth plus one per atom, rounded up by
        ``padded_size`` (at most ``n_atoms * W``); every size at least that of ``previous``,
        inputs built earlier for the same atoms (:func:`~forcecalc.replay.room`: a replay
        keeps its signature while the atoms move).  If moved atoms keep more, the forward
        says so (``overflow``) and the inputs must be built again (with these as
        ``previous``).

        Returns:
            The candidates (:func:`~forcecalc.replay.candidate_inputs`, at least
            ``max_neighbors`` wide), ``system_atoms`` and ``system_slot`` (the
            :class:`RowIndex` tables of ``system_idx``), ``edges`` ``[E]`` and ``columns``
            ``[W]`` (``arange``: the kept edges' ids and an atom's places); for an
            energy-centric model also ``candidates_out`` ``[n_atoms, Wo]`` (the candidates out
            of each atom).
        """
        if not self.fixed_shapes:
            raise ValueError(
                "the fixed-shape forward needs a model that regresses forces (regress_forces)"
            )
        self._check_elements(batch.numbers)
        inputs = candidate_inputs(batch, self.max_neighbors, previous)
        n_atoms, n_candidates = batch.n_atoms, batch.n_edges
        capacity = inputs["candidate_index"].shape[1]
        with torch.no_grad():
            vectors = batch.edge_vectors(inputs["positions"], inputs["cell"])
            # sizes only: the fixed-shape forward reports a cut (``cut``)
            kept, _ = self._select_edges(batch.edge_index, vectors, n_atoms, warn_cut=False)
        counts = torch.bincount(kept[1], minlength=n_atoms)
        width = int(counts.max()) if len(counts) else 0
        width = max(-(-max(width, 1) // 8) * 8, room(previous, "columns", n_atoms))
        n_kept = kept.shape[1]
        n_edges = min(padded_size(n_kept + n_kept // 8 + n_atoms), n_atoms * width)
        n_edges = max(n_edges, room(previous, "edges", n_atoms))
        systems = RowIndex(batch.system_idx, batch.n_systems)
        device = batch.edge_index.device
        inputs.update(
            system_atoms=systems.inverse,
            system_slot=systems.position,
            edges=torch.arange(n_edges, device=device),
            columns=torch.arange(width, device=device),
        )
        if self.force_estimator == "grad":
            out = RowIndex(batch.edge_index[0], n_atoms).inverse
            min_width = room(previous, "candidates_out", n_atoms)
            inputs["candidates_out"] = padded_table(out, n_candidates, capacity, min_width)
        return inputs

    def fixed_shape_forward(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Raw ``energy`` ``[n_systems]`` and ``forces`` ``[n_atoms, 3]`` (for an
        energy-centric model also ``stress`` ``[n_systems, 3, 3]``, not finite for a cell of
        zero volume) from :meth:`fixed_shape_inputs` (on this model's device), and
        ``overflow`` ``[1]`` bool: more edges kept than the inputs have room for (the
        results are then incomplete; build the inputs again); with the envelope also
        ``cut`` ``[1]`` bool: the max-neighbor rule dropped pairs within the cutoff (what
        :meth:`forward` warns of; a caller warns with :func:`warn_max_neighbor_cut`).  The
        numbers of
        :meth:`forward`, with every shape fixed by the inputs' shapes and no host
        synchronisation, so that a CUDA graph can capture it (see
        :class:`forcecalc.replay.GraphReplay`): the edge selection is a mask and a
        compaction, in the forward's edge order.  Inference only (no
        gradient with respect to the parameters); an energy-centric model's gradient runs
        through tables built here (no table is built on a backward pass, which would wait
        for the device)."""
        graph = self._kept_graph(inputs)
        numbers, source = inputs["numbers"], graph["source"]
        systems = RowIndex(
            inputs["system_idx"],
            len(inputs["system_atoms"]),
            inverse=inputs["system_atoms"],
            position=inputs["system_slot"],
        )
        if self.force_estimator == "grad":
            out = self._fixed_shape_gradient(graph, numbers, inputs["cell"], systems)
        else:
            incoming = graph["incoming"]
            tables = (
                RowIndex(graph["target"], len(numbers)),
                RowIndex(incoming, len(source)),
                RowIndex(incoming[source], len(source)),
            )
            with torch.no_grad():
                energy, forces = self._evaluate(numbers, source, graph["vectors"], *tables, systems)
            assert forces is not None
            out = {"energy": energy, "forces": forces}
        out["overflow"] = graph["overflow"]
        if self.envelope:
            out["cut"] = graph["cut"]
        return out

    def _kept_graph(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """The kept edges by fixed-shape operations: candidate vectors, the graph rule as a
        mask (:func:`~forcecalc.graph.neighbors.kept_edges_mask`), then the kept candidates,
        atom by atom in candidate order (the forward's edge order), as edges ``0 .. kept - 1``
        of ``E``; the rest are padding edges (atom 0 to itself along ``x``, listed nowhere).

        Returns ``source``, ``target`` ``[E]``, ``vectors`` ``[E, 3]`` float64, ``incoming``
        ``[n_atoms, W]`` (padded with ``E``), ``target_slot`` ``[E]`` (each edge's flat
        position in ``incoming``, ``n_atoms * W`` for padding), ``overflow`` and ``cut``
        ``[1]`` and, for an energy-centric model, ``outgoing`` ``[n_atoms, Wo]`` and
        ``source_slot`` ``[E]``.
        """
        candidate_source, candidate_target = inputs["candidate_index"]
        into, edges, columns = inputs["candidates_in"], inputs["edges"], inputs["columns"]
        n_atoms, width, n_edges = len(into), len(columns), len(edges)
        capacity = len(candidate_source)
        with torch.no_grad():
            vectors = edge_vectors(
                inputs["positions"],
                inputs["cell"],
                inputs["system_idx"],
                inputs["candidate_index"],
                inputs["candidate_shifts"],
            )
            kept, cut = kept_edges_mask(
                vectors, candidate_target, into, self.cutoff, self.max_neighbors
            )
            kept = pad_rows(kept.unsqueeze(1), False)[:, 0]  # [C + 1]: the padding index too
            # atom i's kept candidates become edges start[i] .. start[i] + count[i] - 1
            keep = kept[into]  # [n_atoms, Wc]
            count = keep.sum(dim=1)
            start = count.cumsum(dim=0) - count
            rank = keep.cumsum(dim=1) - 1
            edge_id = start.unsqueeze(1) + rank
            fits = keep & (rank < width) & (edge_id < n_edges)
            overflow = (keep & ~fits).any().view(1)
            candidate = torch.full((n_edges + 1,), capacity, dtype=into.dtype, device=into.device)
            candidate = candidate.scatter(
                0, torch.where(fits, edge_id, n_edges).reshape(-1), into.reshape(-1)
            )
            candidate = candidate[:n_edges]  # [E]: the candidate of each edge
            filled = candidate < capacity
            # atom i's edges, in its first count[i] places (the places of edges past E stay
            # empty; they only occur with an overflow)
            listed = start.unsqueeze(1) + columns  # [n_atoms, W]
            listed = (columns < count.unsqueeze(1)) & (listed < n_edges)
            incoming = torch.where(listed, start.unsqueeze(1) + columns, n_edges)
            places = torch.arange(n_atoms * width, device=edges.device)
            target_slot = torch.full(
                (n_edges + 1,), n_atoms * width, dtype=edges.dtype, device=edges.device
            )
            target_slot = target_slot.scatter(0, incoming.reshape(-1), places)[:n_edges]
            graph = {
                "source": pad_rows(candidate_source.unsqueeze(1))[candidate, 0],
                "target": pad_rows(candidate_target.unsqueeze(1))[candidate, 0],
                "vectors": torch.where(  # padding edges along x, from no host data
                    filled.unsqueeze(1),
                    pad_rows(vectors)[candidate],
                    (torch.arange(3, device=vectors.device) == 0).to(vectors.dtype),
                ),
                "incoming": incoming,
                "target_slot": target_slot,
                "overflow": overflow,
                "cut": cut,
            }
            if "candidates_out" in inputs:
                # the kept edges out of each atom (in candidate order); this table has room
                # for every candidate, so it never overflows
                out = inputs["candidates_out"]
                edge_of = torch.full_like(kept, n_edges, dtype=edges.dtype)  # [C + 1]
                edge_of = edge_of.scatter(0, torch.where(filled, candidate, capacity), edges)
                edge_of[capacity:].fill_(n_edges)  # a Python number set by a kernel, no copy
                outgoing = edge_of[_compacted(out, kept, out.shape[1], capacity)]
                n_places = outgoing.numel()
                source_slot = torch.full_like(edges, n_places)
                source_slot = pad_rows(source_slot.unsqueeze(1))[:, 0].scatter(
                    0, outgoing.reshape(-1), torch.arange(n_places, device=edges.device)
                )[:n_edges]
                graph["outgoing"] = outgoing
                graph["source_slot"] = source_slot
        return graph

    def _fixed_shape_gradient(
        self, graph: dict[str, Tensor], numbers: Tensor, cell: Tensor, systems: RowIndex
    ) -> dict[str, Tensor]:
        """:meth:`fixed_shape_forward` of an energy-centric model on its kept graph: the
        energy's gradient with respect to the edge vectors ``g`` (one backward pass), then
        forces (``v = x_source - x_target + shift``: ``F_i`` is the sum of ``g`` over the
        edges into ``i`` minus the sum over the edges out of it) and stress (``sum_e v_e
        g_e^T`` per system, symmetrized, over the volume)."""
        _check_autograd_available()
        tables = self.gradient_tables({"numbers": numbers, **graph})
        target_rows, incoming_rows, neighbor_rows, outgoing_rows = tables
        with torch.enable_grad():
            vectors = graph["vectors"].detach().requires_grad_(True)
            energy, _ = self._evaluate(
                numbers,
                graph["source"],
                vectors,
                target_rows,
                incoming_rows,
                neighbor_rows,
                systems,
            )
            (gradient,) = torch.autograd.grad(energy.sum(), [vectors])
        dtype = self.distfc1.weight.dtype
        forces = incoming_rows.gather(gradient).sum(dim=1) - outgoing_rows.gather(gradient).sum(1)
        out = {"energy": energy.detach(), "forces": forces.to(dtype)}
        if self.defines_stress:
            outer = vectors.detach().unsqueeze(2) * gradient.unsqueeze(1)  # [edges, 3, 3]
            derivative = systems.sum_by_row(incoming_rows.gather(outer).sum(dim=1))
            derivative = 0.5 * (derivative + derivative.transpose(1, 2))
            volume = (cell[:, 0] * torch.linalg.cross(cell[:, 1], cell[:, 2], dim=1)).sum(dim=1)
            out["stress"] = (derivative / volume.abs().view(-1, 1, 1)).to(dtype)
        return out

    @staticmethod
    def gradient_tables(
        inputs: dict[str, Tensor],
    ) -> tuple[RowIndex, RowIndex, RowIndex, RowIndex]:
        """The gathers of an energy-centric fixed-shape forward with their inverse tables
        (what their backward passes read), built by fixed-shape operations from its slot graph
        (``numbers`` and the tables of :meth:`_kept_graph`): edge targets (``[edges]`` into
        atoms), the edges into every atom and into every edge's source (both into edges), and
        the edges out of every atom.  Padding edges are neither listed nor read; their
        gradients are zero (nothing reads them)."""
        source, target, incoming, outgoing, target_slot, source_slot = (
            inputs[name]
            for name in ("source", "target", "incoming", "outgoing", "target_slot", "source_slot")
        )
        n_atoms, capacity = len(inputs["numbers"]), len(source)
        width, out_width = incoming.shape[1], outgoing.shape[1]
        target_rows = RowIndex(target, n_atoms, inverse=incoming, position=target_slot)
        incoming_rows = RowIndex(
            incoming, capacity, inverse=target_slot.view(-1, 1), position=incoming.reshape(-1)
        )
        outgoing_rows = RowIndex(
            outgoing, capacity, inverse=source_slot.view(-1, 1), position=outgoing.reshape(-1)
        )
        # Entry (e, c) of the neighbor table reads e' = incoming[source[e], c].  So the readers
        # of e' (an edge into t', in column c' of t''s row) are the entries (e, c') of the
        # edges e out of t', and entry (e, c) is read by e' at e's rank among the edges out of
        # its source.
        neighbors = incoming[source]
        readers = outgoing[target]
        read = (readers < capacity) & (target_slot < n_atoms * width).unsqueeze(1)
        neighbor_inverse = torch.where(
            read, readers * width + (target_slot % width).unsqueeze(1), capacity * width
        )
        reading = (neighbors < capacity) & (source_slot < n_atoms * out_width).unsqueeze(1)
        neighbor_position = torch.where(
            reading,
            neighbors * out_width + (source_slot % out_width).unsqueeze(1),
            capacity * out_width,
        )
        neighbor_rows = RowIndex(
            neighbors, capacity, inverse=neighbor_inverse, position=neighbor_position.reshape(-1)
        )
        return target_rows, incoming_rows, neighbor_rows, outgoing_rows

    def _select_edges(
        self, edge_index: Tensor, vectors: Tensor, n_atoms: int, warn_cut: bool = True
    ) -> tuple[Tensor, Tensor]:
        """Drop pairs at or beyond the cutoff (OCP keeps ``d <= cutoff``) and coincident pairs, then
        apply the max-neighbor rule (:func:`~forcecalc.graph.neighbors.kept_edges_mask`);
        with the envelope, warn if it cut (``warn_cut``)."""
        target = edge_index[1]
        with torch.no_grad():
            kept, cut = kept_edges_mask(
                vectors, target, RowIndex(target, n_atoms).inverse, self.cutoff, self.max_neighbors
            )
            keep = torch.nonzero(kept).view(-1)
            # a model with the envelope is smooth only while the rule never cuts
            if self.envelope and warn_cut and bool(cut):
                warn_max_neighbor_cut(self.max_neighbors, self.cutoff)
        return edge_index[:, keep], vectors[keep]

    def _direct_forces(
        self,
        x: Tensor,
        unit: Tensor,
        incoming: Tensor,
        numbers: Tensor,
        edge_weight: Tensor | None,
    ) -> Tensor:
        """Force-centric forces: all ``3 x R`` frames of every atom in one pass (messages
        weighted by ``edge_weight`` ``[n_edges]`` if given: the envelope)."""
        n_atoms, n_edges = len(numbers), len(unit)
        if self.random_rotations:
            rotations = ocp_random_rotations(
                self.num_rand_rotations * n_atoms, device=unit.device
            ).view(self.num_rand_rotations, n_atoms, 3, 3)
        else:
            rotations = self.rotations.to(torch.float64)
        n_rot = len(rotations)
        with torch.no_grad():
            frames = _axis_frames(rotations)  # [R, 3, (n_atoms,) 3, 3]
            # Grid (r, axis, atom) receives the messages into the atom.
            grid_neighbors = incoming.repeat(3 * n_rot, 1)
            readers = RowIndex(grid_neighbors, n_edges)
            table = self.splat_table(x.dtype, unit.device)
            if self._fused_geometry(x.dtype):
                grid_frames = frames if self.random_rotations else frames.unsqueeze(2)
                grid_frames = grid_frames.expand(n_rot, 3, n_atoms, 3, 3).reshape(-1, 3, 3)
                projections = SphereProjections.from_frames(
                    grid_frames, unit, readers, self.lat, table
                )
            else:
                directions = pad_rows(unit)[incoming]  # [n_atoms, width, 3]
                if self.random_rotations:
                    projected = torch.einsum("ranxc,njc->ranjx", frames, directions)
                else:
                    projected = torch.einsum("raxc,njc->ranjx", frames, directions)
                projections = SphereProjections.from_directions(
                    projected.reshape(3 * n_rot * n_atoms, -1, 3),
                    readers,
                    self.lat,
                    self.long,
                    x.dtype,
                    table,
                )
        if edge_weight is not None:
            projections = projections.weighted(pad_rows(edge_weight)[grid_neighbors])
        element = numbers.repeat(3 * n_rot)
        along_axis = self.force_output_block(x, projections, element)[:, 0]
        along_axis = along_axis.view(n_rot, 3, n_atoms)
        rotations = rotations.to(x.dtype)
        if self.random_rotations:
            forces = torch.einsum("rnac,ran->nc", rotations, along_axis)
        else:
            forces = torch.einsum("rac,ran->nc", rotations, along_axis)
        return forces / n_rot


def trainable_distance_blocks(model: nn.Module) -> dict[str, DistanceBlock]:
    """The distance blocks of ``model`` whose pair scalings train, by module name."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, DistanceBlock) and module.trainable_pairs
    }


def fill_untrained_pairs(
    model: nn.Module, trained: dict[str, Tensor] | None = None
) -> list[tuple[int, int]]:
    """:meth:`DistanceBlock.fill_untrained_pairs` on every distance block of ``model`` (in
    place), each with its ``trained`` pairs (by module name, as
    :func:`trainable_distance_blocks`), where given; returns the element pairs filled in any
    of them, sorted."""
    trained = trained or {}
    blocks = trainable_distance_blocks(model)
    return sorted(
        {
            pair
            for name, block in blocks.items()
            for pair in block.fill_untrained_pairs(trained.get(name))
        }
    )


def ocp_random_rotations(
    n: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> Tensor:
    """``[n, 3, 3]`` float64 rotations drawn as OCP's force block draws them: three angles
    uniform in ``[0, 2 pi)``, ``R = R_x(a) R_y(b) R_z(c)`` (OCP's sign conventions)."""
    angles = torch.rand(3, n, generator=generator, dtype=torch.float64, device=device)
    angles = 2.0 * math.pi * angles
    cos, sin = angles.cos(), angles.sin()
    one, zero = torch.ones_like(cos[0]), torch.zeros_like(cos[0])

    def matrix(rows: list[list[Tensor]]) -> Tensor:
        return torch.stack([torch.stack(row, dim=-1) for row in rows], dim=-2)

    rot_a = matrix([[one, zero, zero], [zero, cos[0], sin[0]], [zero, -sin[0], cos[0]]])
    rot_b = matrix([[cos[1], zero, -sin[1]], [zero, one, zero], [sin[1], zero, cos[1]]])
    rot_c = matrix([[cos[2], sin[2], zero], [-sin[2], cos[2], zero], [zero, zero, one]])
    return rot_a @ rot_b @ rot_c


def cosine_cutoff(distances: Tensor, cutoff: float) -> Tensor:
    """``(cos(pi d / cutoff) + 1) / 2``: 1 at ``d = 0``, zero value and slope at the cutoff."""
    return 0.5 * (torch.cos(distances * (math.pi / cutoff)) + 1.0)


def _compacted(table: Tensor, kept: Tensor, width: int, fill: int) -> Tensor:
    """Each row's kept entries of ``table`` ``[rows, w]`` (indices into ``kept`` ``[n + 1]``,
    bool), in order, in a ``[rows, width]`` table padded with ``fill`` (entries beyond
    ``width`` are dropped: pass ``width >= w`` to keep all).  Fixed shapes, no host
    synchronisation."""
    keep = kept[table]
    rank = keep.cumsum(dim=1) - 1
    fits = keep & (rank < width)
    rows = len(table)
    start = torch.arange(rows, device=table.device).unsqueeze(1) * width
    place = torch.where(fits, start + rank, rows * width)
    compact = torch.full((rows * width + 1,), fill, dtype=table.dtype, device=table.device)
    compact = compact.scatter(0, place.reshape(-1), table.reshape(-1))[:-1]
    return compact.view(rows, width)


def _unit_rows(vectors: Tensor) -> Tensor:
    """``[n, 3]`` rows divided by their norms."""
    return vectors / torch.linalg.norm(vectors, dim=1, keepdim=True)


def _axis_frames(rotations: Tensor) -> Tensor:
    """The force block's three frames per rotation, rows = axes: ``[R, (n,) 3, 3] ->
    [R, 3, (n,) 3, 3]``.  Frame ``a`` has row ``a`` of ``R`` as its polar axis: ``R``,
    ``(R1, -R0, R2)`` and ``(R2, R1, -R0)`` (OCP's ``rot_y @ R`` and ``rot_z @ R``)."""
    r0, r1, r2 = rotations[..., 0, :], rotations[..., 1, :], rotations[..., 2, :]
    frame_y = torch.stack([r1, -r0, r2], dim=-2)
    frame_z = torch.stack([r2, r1, -r0], dim=-2)
    return torch.stack([rotations, frame_y, frame_z], dim=1)


def _edge_frames(
    vectors: Tensor,
    distances: Tensor,
    unit: Tensor,
    target: RowIndex,
    incoming: RowIndex,
    cutoff: float,
) -> Tensor:
    """``[n_edges, 3, 3]`` edge frames, rows ``(x, y, z)``: ``x = v/|v|``; the roll from the
    target's cosine-weighted mean neighbor vector (+1e-4 per component), with OCP's +1e-7 in
    the normalisations of ``z`` and ``y``; for an edge within 1e-6 rad of that helper
    direction, or within 1e-3 rad of a hypersensitive one (:data:`HELPER_SENSITIVE`), from
    the mean vector plus :data:`ROLL_FALLBACK` (see the module docstring)."""
    weight = cosine_cutoff(distances, cutoff)
    mean_vector = incoming.gather(vectors * weight.unsqueeze(1)).sum(dim=1)  # [n_atoms, 3]
    mean_vector = target.gather(mean_vector)  # [n_edges, 3]
    offset = mean_vector + 1e-4
    helper = _unit_rows(offset)
    cross = torch.linalg.cross(unit, helper, dim=1)
    cross2 = (cross * cross).sum(dim=1, keepdim=True)
    sensitive = (offset * offset).sum(dim=1, keepdim=True) < HELPER_SENSITIVE**2
    along = (cross2 < POLE_EPS2) | (sensitive & (cross2 < HELPER_EPS2))
    fallback = _unit_rows(
        torch.stack([mean_vector[:, i] + ROLL_FALLBACK[i] for i in range(3)], dim=1)
    )
    helper = torch.where(along, fallback, helper)
    axis_z = torch.linalg.cross(unit, helper, dim=1)
    axis_z = axis_z / (torch.linalg.norm(axis_z, dim=1, keepdim=True) + 1e-7)
    axis_y = torch.linalg.cross(unit, axis_z, dim=1)
    axis_y = axis_y / (torch.linalg.norm(axis_y, dim=1, keepdim=True) + 1e-7)
    return torch.stack([unit, axis_y, axis_z], dim=1)


def splat_factors(
    projected: Tensor,
    valid: Tensor,
    lat: int,
    long: int,
    dtype: torch.dtype,
    table: Tensor | None = None,
) -> tuple[LongitudeSplat, LatitudeSplat]:
    """Bilinear splat of directions onto a lat/long grid, as longitude spectra (factored).

    A direction ``p`` (row 0 = the grid's polar axis) lands at latitude row
    ``Y = (0.99 (asin(p0) + pi/2) / pi + 0.005) (lat - 1)`` and longitude column
    ``X = (atan2(p1, p2) + pi) / (2 pi) long`` and is splatted bilinearly onto the four
    surrounding cells (OCP's ``_project2D_init``; the longitude wraps around).  Instead of the
    grid, the factors of its real DFT along the longitude are returned: a unit value splatted
    there has spectrum ``rows[y] * phase[k]`` with ``rows = (1 - dy) [y0] + dy [y0 + 1]`` and
    ``phase = (1 - dx) D[x0] + dx D[x1]``, where ``D[x]`` is the packed DFT of a unit impulse
    at column ``x`` (:func:`_packed_frequencies`: ``long`` real numbers, the real parts of
    ``e^{-2 pi i f x / long}`` at every frequency ``f <= long / 2``, then the imaginary parts
    at ``0 < f < long / 2``; the others vanish for a real grid).  The geometry is evaluated in
    float64 (see the module docstring for the pole convention and derivative).

    Args:
        projected: ``[..., 3]`` float64 directions in the grid frames.
        valid: ``[...]`` bool, False for padding (weight zero).
        dtype: dtype of the returned factors.
        table: :func:`_splat_dft_table` in ``dtype`` on ``projected``'s device, if already
            built (a constant: about 15 operations less per call).

    Returns:
        the longitudes and latitudes (:class:`LongitudeSplat`, whose ``phase`` is ``[...,
        long]``, and :class:`LatitudeSplat`, whose ``rows`` are ``[..., lat]``).
    """
    y, z, p0 = projected[..., 1], projected[..., 2], projected[..., 0]
    pole = y * y + z * z < POLE_EPS2
    # On the pole: longitude atan2(+0, +0) = 0 and latitude exactly +-pi/2, constants (the
    # functions are evaluated at safe arguments there so that autograd never sees 0/0).
    longitude = torch.atan2(torch.where(pole, 0.0, y), torch.where(pole, 1.0, z))
    latitude = torch.asin(torch.where(pole, 0.0, p0).clamp(-1.0, 1.0))
    half_pi = torch.full_like(p0, math.pi / 2)
    latitude = torch.where(pole, torch.where(p0 > 0, half_pi, -half_pi), latitude)
    col = (longitude + math.pi) / (2.0 * math.pi) * long
    row = (0.99 * ((latitude + math.pi / 2.0) / math.pi) + 0.005) * (lat - 1.0)
    col_floor, row_floor = torch.floor(col), torch.floor(row)
    # The bins in float64; the weights in ``dtype``, built directly (no one-hot temporaries).
    dx = (col - col_floor).to(dtype)
    dy = (row - row_floor).to(dtype) * valid
    if table is None:
        table = _splat_dft_table(long, projected.device).to(dtype)  # [long, long]
    longitudes = LongitudeSplat(col_floor.long() % long, dx, table)
    return longitudes, LatitudeSplat(row_floor.long() % lat, dy, valid, lat)


class LongitudeSplat:
    """Where splatted values land along the longitude of their grids: between the columns
    ``column`` and ``column + 1`` (modulo ``long``), ``fraction`` of the way.  Their longitude
    spectra, :attr:`phase`, interpolate the packed DFTs of the two columns (rows of
    ``table``); the fused Triton kernels read the three factors instead, so ``phase`` is only
    built where it is used (once, in the grad mode of that first use).

    Args:
        column: ``[...]`` int64 in ``[0, long)``.
        fraction: ``[...]`` in ``[0, 1)``, the factors' dtype.
        table: ``[long, long]``, :func:`_splat_dft_table` in that dtype.
    """

    def __init__(self, column: Tensor, fraction: Tensor, table: Tensor) -> None:
        self.column = column
        self.fraction = fraction
        self.table = table
        # built on first use (a plain attribute: torch.compile traces it, where it breaks
        # the graph at functools.cached_property's lock on Python <= 3.11)
        self._phase: Tensor | None = None

    @property
    def long(self) -> int:
        return len(self.table)

    def split(self, step: int) -> list[LongitudeSplat]:
        """Chunks of ``step`` grids (along the first dimension)."""
        chunks = zip(self.column.split(step), self.fraction.split(step), strict=True)
        return [LongitudeSplat(column, fraction, self.table) for column, fraction in chunks]

    @property
    def phase(self) -> Tensor:
        """``[..., long]``: ``(1 - fraction) table[column] + fraction table[column + 1]``."""
        if self._phase is None:
            after = (self.column + 1) % self.long
            fraction = self.fraction.unsqueeze(-1)
            self._phase = torch.lerp(self.table[self.column], self.table[after], fraction)
        return self._phase


class LatitudeSplat:
    """Where splatted values land along the latitude of their grids: between the rows ``row``
    and ``row + 1`` (modulo ``lat``), ``fraction`` of the way, scaled by ``weight`` (if
    given); nowhere where not ``valid`` (padding).  Their :attr:`rows` are the bilinear
    weights ``(1 - fraction) [row] + fraction [row + 1]``; the fused Triton kernels read the
    factors instead, so ``rows`` are only built where they are used (once, in the grad mode of
    that first use).

    Args:
        row: ``[...]`` int64 in ``[0, lat)``.
        fraction: ``[...]`` in ``[0, 1)``, zero where not ``valid``, the factors' dtype.
        valid: ``[...]`` bool.
        lat: latitudes of the grids.
        weight: ``[...]`` scale of each value, or None.
    """

    def __init__(
        self, row: Tensor, fraction: Tensor, valid: Tensor, lat: int, weight: Tensor | None = None
    ) -> None:
        self.row = row
        self.fraction = fraction
        self.valid = valid
        self.lat = lat
        self.weight = weight
        self._rows: Tensor | None = None  # built on first use (see LongitudeSplat)

    def weighted(self, weights: Tensor) -> LatitudeSplat:
        """The same latitudes with each value scaled by ``weights`` (``[...]``, or broadcast
        to it), too."""
        weights = torch.broadcast_to(weights, self.row.shape)
        weight = weights if self.weight is None else self.weight * weights
        return LatitudeSplat(self.row, self.fraction, self.valid, self.lat, weight)

    @property
    def requires_grad(self) -> bool:
        weighted = self.weight is not None and self.weight.requires_grad
        return self.fraction.requires_grad or weighted

    def split(self, step: int) -> list[LatitudeSplat]:
        """Chunks of ``step`` grids (along the first dimension)."""
        tables = [self.row, self.fraction, self.valid]
        tables += [] if self.weight is None else [self.weight]
        return [
            LatitudeSplat(row, fraction, valid, self.lat, *weight)
            for row, fraction, valid, *weight in zip(*(t.split(step) for t in tables), strict=True)
        ]

    @property
    def rows(self) -> Tensor:
        """``[..., lat]``: ``weight ((valid - fraction) [row] + fraction [row + 1])``."""
        if self._rows is None:
            latitudes = torch.arange(self.lat, device=self.row.device)
            row, fraction = self.row.unsqueeze(-1), self.fraction.unsqueeze(-1)
            valid = self.valid.to(fraction.dtype).unsqueeze(-1)
            lower = torch.where(latitudes == row, valid - fraction, 0.0)
            rows = lower + torch.where(latitudes == (row + 1) % self.lat, fraction, 0.0)
            self._rows = rows if self.weight is None else rows * self.weight.unsqueeze(-1)
        return self._rows


class SphereProjections:
    """Values projected onto lat/long grids, kept as splat factors: grid ``g`` receives
    ``values[readers.index[g, j]]`` at the direction whose factors are ``longitude`` and
    ``latitude`` at ``[g, j]`` (see :func:`splat_factors`); the index is padded with
    ``len(values)``.

    The grids' packed spectra (``[n, C, long, lat]``) are only built chunk by chunk inside
    :meth:`spin_convolution`, so memory stays bounded for large systems.
    """

    def __init__(
        self, readers: RowIndex, longitude: LongitudeSplat, latitude: LatitudeSplat
    ) -> None:
        self.readers = readers
        self.longitude = longitude
        self.latitude = latitude
        # Splat weights by chunk size, kept across the message blocks (if they fit).
        self._weights: dict[int, list[Tensor]] = {}

    def weighted(self, weights: Tensor) -> SphereProjections:
        """The same grids with value ``j`` of grid ``g`` scaled by ``weights[g, j]``."""
        return SphereProjections(self.readers, self.longitude, self.latitude.weighted(weights))

    @classmethod
    def from_directions(
        cls,
        projected: Tensor,
        readers: RowIndex,
        lat: int,
        long: int,
        dtype: torch.dtype,
        table: Tensor | None = None,
    ) -> SphereProjections:
        """``projected`` ``[n, width, 3]`` directions of the values ``readers`` reads
        (``[n, width]``); ``table`` as for :func:`splat_factors`."""
        valid = readers.index < readers.n_rows
        return cls(readers, *splat_factors(projected, valid, lat, long, dtype, table))

    @classmethod
    def from_frames(
        cls, frames: Tensor, unit: Tensor, readers: RowIndex, lat: int, table: Tensor
    ) -> SphereProjections:
        """The grids of :meth:`from_directions` for the directions ``unit[readers.index]``
        (``unit`` ``[n_values, 3]`` float64) in the frames ``frames`` (``[n, 3, 3]``
        float64), by the fused Triton kernels
        (:func:`~forcecalc.models.triton_kernels.splat_directions`; float32 factors, no
        autograd); ``table`` as for :func:`splat_factors`, float32."""
        from forcecalc.models.triton_kernels import splat_directions

        if readers.n_rows != len(unit):
            raise ValueError(f"readers of {readers.n_rows} rows for {len(unit)} directions")
        column, fraction, row, rise = splat_directions(
            frames, unit, readers.index, lat, len(table), POLE_EPS2
        )
        valid = readers.index < readers.n_rows
        latitude = LatitudeSplat(row, rise, valid, lat)
        return cls(readers, LongitudeSplat(column, fraction, table), latitude)

    def spin_convolution(self, block: SpinConvBlock, values: Tensor) -> Tensor:
        """``block`` applied to the projected grids of ``values`` ``[n_values, C]``: ``[n,
        mid]``, in chunks of grids (each chunk's packed spectra ``[chunk, C, long, lat]`` are
        built, convolved and dropped).

        The splat weights of each chunk (``[chunk, width, long * lat]``) are kept for the next
        call (the message blocks share them) when all of them fit in ``WEIGHT_CACHE_BYTES``,
        on a GPU or with autograd (which saves them for the backward pass anyway, once instead
        of once per block).  On the CPU without autograd they are remade per chunk, in cache:
        reading them back from memory was slower (SpinConv-All, 66 atoms, 2 threads: 382
        against 407 ms per forward; spinconv-fc, 146 atoms: 72 against 90 ms per ASE step).
        Chunks are splits, not slices: the gradient of a split is one concatenation, that of
        a slice a zero-filled tensor of the full size per chunk.
        """
        n, width = self.readers.index.shape
        channels, long, lat = values.shape[1], self.longitude.long, self.latitude.lat
        itemsize = values.element_size()
        per_grid = itemsize * ((width + 2 * channels) * long * lat + 2 * block.mid_channels * long)
        budget = CHUNK_BYTES_CUDA if values.is_cuda else CHUNK_BYTES
        step = max(1, budget // per_grid)
        recording = torch.is_grad_enabled() and (
            values.requires_grad
            or self.longitude.fraction.requires_grad
            or self.latitude.requires_grad
        )
        if not recording and uses_kernels(block.triton_precision, values, block):
            return self._fused_spin_convolution(block, values)
        cache = (values.is_cuda or recording) and (
            n * width * long * lat * itemsize <= WEIGHT_CACHE_BYTES
        )
        kernels = block.kernels()
        outputs = []
        for features, weights in zip(
            self._chunk_features(values, step), self._chunk_weights(step, cache), strict=True
        ):
            spectrum = torch.bmm(features.transpose(1, 2), weights)
            outputs.append(block(spectrum.view(len(spectrum), channels, long, lat), kernels))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _fused_spin_convolution(self, block: SpinConvBlock, values: Tensor) -> Tensor:
        """:meth:`spin_convolution` by the fused Triton kernels (float32, no autograd), in
        chunks of grids whose spectra ``[long, groups, chunk, (C / groups) lat]`` fit in
        ``CHUNK_BYTES_CUDA``."""
        from forcecalc.models.triton_kernels import (
            paired_kernels,
            product_precisions,
            spin_pool,
            spin_spectra,
            tf32_rounded,
        )

        longitude, latitude = self.longitude, self.latitude
        per_grid = values.element_size() * values.shape[1] * longitude.long * latitude.lat
        step = max(1, CHUNK_BYTES_CUDA // per_grid)
        real, imag, inverse = block.kernel_spectra()
        pairs = paired_kernels(real, imag, longitude.long)
        spectra_precision, products_precision, rounded = product_precisions(block.triton_precision)
        pairs = tf32_rounded(pairs) if rounded else pairs
        # the block's GroupNorm in the pooling kernel's pass (unless replaced by another module)
        fused_norm = block.GroupNorm if type(block.GroupNorm) is nn.GroupNorm else None
        outputs = []
        for index, longitudes, latitudes in zip(
            self.readers.index.split(step),
            longitude.split(step),
            latitude.split(step),
            strict=True,
        ):
            spectra = spin_spectra(
                values, index, longitudes, latitudes, block.groups, spectra_precision, rounded
            )
            pooled = spin_pool(
                spectra, pairs, inverse, block.conv1.bias, products_precision, fused_norm
            )
            outputs.append(pooled if fused_norm is not None else block.GroupNorm(pooled))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _chunk_weights(self, step: int, cache: bool) -> Iterable[Tensor]:
        """Splat weights ``[chunk, width, long * lat]`` of the chunks of ``step`` grids (kept
        if ``cache``, else made one at a time)."""
        if step in self._weights:
            return self._weights[step]
        chunks = (
            (phase.unsqueeze(-1) * rows.unsqueeze(-2)).flatten(-2)
            for phase, rows in zip(
                self.longitude.phase.split(step), self.latitude.rows.split(step), strict=True
            )
        )
        if not cache:
            return chunks
        self._weights[step] = list(chunks)
        return self._weights[step]

    def _chunk_features(self, values: Tensor, step: int) -> Iterable[Tensor]:
        """``[chunk, width, C]`` neighbor values of the chunks of ``step`` grids.  With
        autograd they are gathered for all grids at once through ``readers`` (whose inverse
        tables, built on the first backward pass, serve every later one) and split: the
        backward saves every chunk's values anyway, and one gather's gradient is one pass over
        the values, where a gather per chunk makes a full ``[n_values, C]`` gradient per
        chunk.  Without, one chunk at a time (bounded memory) from the values padded once."""
        if torch.is_grad_enabled() and values.requires_grad:
            return self.readers.gather(values).split(step)
        padded = pad_rows(values)  # once, not per chunk (a copy of all values per chunk otherwise)
        return (take_rows(padded, index) for index in self.readers.index.split(step))


def _packed_frequencies(long: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The packed real spectrum of a length-``long`` real signal: the real parts at the
    frequencies :func:`_edge_frequencies` and :func:`_middle_frequencies`, then the imaginary
    parts at the middle ones (``long`` numbers in all).  Returns each entry's frequency
    ``[long]`` float64 and whether it is an imaginary part ``[long]`` bool (built on
    ``device`` from an ``arange``: no host-to-device copy)."""
    n_edge, n_middle = len(_edge_frequencies(long)), len(_middle_frequencies(long))
    k = torch.arange(long, dtype=torch.float64, device=device)
    imaginary = k >= n_edge + n_middle
    middle = torch.where(imaginary, k - (n_edge + n_middle - 1), k - (n_edge - 1))
    return torch.where(k < n_edge, k * (long // 2), middle), imaginary


def _splat_dft_table(long: int, device: torch.device) -> Tensor:
    """``[long, long]`` float64: row ``x`` is the packed DFT (:func:`_packed_frequencies`) of a
    unit impulse at column ``x``: ``cos(2 pi f x / long)`` (real), ``-sin(2 pi f x / long)``
    (imaginary)."""
    frequency, imaginary = _packed_frequencies(long, device)
    x = torch.arange(long, dtype=torch.float64, device=device).unsqueeze(1)
    angle = 2.0 * math.pi * x * frequency / long
    return torch.where(imaginary, -angle.sin(), angle.cos())


def _dft_matrices(long: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """``cos`` and ``sin`` of ``2 pi k f / long``, ``[long, n_freq]``."""
    k = torch.arange(long, dtype=torch.float64, device=device).unsqueeze(1)
    f = torch.arange(long // 2 + 1, dtype=torch.float64, device=device)
    angle = 2.0 * math.pi * k * f / long
    return angle.cos().to(dtype), angle.sin().to(dtype)


def _middle_frequencies(long: int) -> range:
    """Frequencies whose DFT coefficients of a real signal are complex: ``0 < f < long / 2``."""
    return range(1, (long + 1) // 2)


def _edge_frequencies(long: int) -> range:
    """Frequencies whose DFT coefficients of a real signal are real: 0 and, for even ``long``,
    ``long / 2``."""
    return range(0, long // 2 + 1, long // 2) if long % 2 == 0 and long > 1 else range(1)


def _frequency_slice(frequencies: range) -> slice:
    """``frequencies`` as a slice: indexing with it is a view, where indexing with a list of
    integers copies the list to the device first (on CUDA a synchronizing host-to-device
    copy)."""
    return slice(frequencies.start, frequencies.stop, frequencies.step)


def _inverse_dft_matrix(long: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[long, long]``: row ``k`` maps entry ``k`` of a packed spectrum
    (:func:`_packed_frequencies`) to the ``long`` samples of the real signal (the inverse DFT,
    counting the conjugate frequency ``long - f`` of every middle frequency ``f``)."""
    frequency, imaginary = _packed_frequencies(long, device)
    f, imaginary = frequency.unsqueeze(1), imaginary.unsqueeze(1)
    x = torch.arange(long, dtype=torch.float64, device=device)
    angle = 2.0 * math.pi * f * x / long
    middle = (f > 0) & (2 * f != long)
    inverse = torch.where(imaginary, -angle.sin(), angle.cos()) * torch.where(middle, 2.0, 1.0)
    return (inverse / long).to(dtype)


def _kept_constant(
    cache: dict[tuple[torch.dtype, torch.device], _Constant],
    dtype: torch.dtype,
    device: torch.device,
    build: Callable[[], _Constant],
) -> _Constant:
    """``build()`` kept in ``cache`` by ``(dtype, device)``: built on first use as ordinary
    tensors without history (also under ``torch.inference_mode``), then reused."""
    key = (dtype, device)
    if key not in cache:
        with torch.inference_mode(False), torch.no_grad():
            cache[key] = build()
    return cache[key]


def uses_kernels(triton_precision: str | None, x: Tensor, *parts: nn.Module | Tensor) -> bool:
    """Whether a block computes ``x`` with the fused Triton kernels: asked for
    (``triton_precision``), ``x`` float32, and autograd recording nothing on ``x`` and
    ``parts`` (other tensors, and modules whose parameters the block uses).  The kernels have
    no backward: inference takes them; in training even a block whose inputs need no
    gradient has weights that do, unless frozen."""
    if triton_precision is None or x.dtype != torch.float32:
        return False
    if not torch.is_grad_enabled():
        return True
    for part in (x, *parts):
        tensors = part.parameters() if isinstance(part, nn.Module) else (part,)
        if any(t.requires_grad for t in tensors):
            return False
    return True


def _check_autograd_available() -> None:
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "an energy-centric SpinConv's forces and stress are gradients of its energy: "
            "they need autograd, which torch.inference_mode() turns off (torch.no_grad() "
            "is fine)"
        )


def _zeros_if_none(grad: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if grad is None else grad
