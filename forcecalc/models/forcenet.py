"""ForceNet (Hu et al., 2021): a force-centric message-passing network with direct forces.

A re-implementation that loads the Open Catalyst Project's ForceNet checkpoints strictly (same
parameter names and shapes as OCP's ``ocpmodels.models.forcenet.ForceNet``) and reproduces
their outputs.  The network, for atoms ``i`` with neighbors ``j`` (edge vector ``v = x_j - x_i``
plus the periodic shift, ``d = |v|``, unit ``n = v / d``):

* node input ``h_i``: the atom's nine properties (``atom_map``, :mod:`forcecalc.models.elements`)
  through a basis expansion and a linear layer (``feat="full"``), or a learned per-element
  embedding (``feat="simple"``);
* edge input: ``n`` and the four distances ``p = [d, d - r_j, d - r_i, d - r_j - r_i] / cutoff``
  (atomic radii ``r``, clamped below at 1e-3), expanded by the basis (``sphallmul``: real
  spherical harmonics of ``n`` times a learned mix of ``sin(1.1**k p)``); edge weight
  ``cos(pi d / (2 cutoff))``;
* each interaction: ``h += mlp_trans(sum_j lin(h)_j * W_ij + center_W * lin(h)_i)`` with the
  filter ``W_ij = mlp_edge([lin_basis(edge), h_j, h_i]) * weight_ij``;
* output: ``h = act(lin(h))``; forces ``decoder(h)`` (``[n_atoms, 3]``), energy
  ``energy_mlp(sum_i h_i)`` per system.  ForceNet is not rotation-equivariant (by design).

The graph, from the batch's edges (which may be a superset built at a larger radius):

* edges at or beyond ``cutoff`` are dropped (OCP keeps ``d**2 <= cutoff**2``), and so are edges
  shorter than 0.01 Å (OCP's ``radius_graph_pbc`` drops ``d**2 <= 1e-4``: an atom's own zero
  shift, and overlapping atoms);
* each atom keeps its 50 closest neighbors (OCP's hard-coded ``max_neighbors``) plus every
  neighbor tied with the 50th (:func:`forcecalc.graph.neighbors.max_neighbors_mask`); OCP
  keeps exactly 50, chosen by sort order, so the two differ only where such a tie exists.

Speed: the first layer of ``mlp_edge`` acts on ``[lin_basis(edge), h_j, h_i]``; it is split
into its three blocks, the node blocks applied once per atom and gathered, and the edge block
folded into ``lin_basis`` (same function, ~2.5x fewer operations per edge).  The spherical
harmonics are computed in torch (polynomials of ``n``, no ``acos``/``atan2``), on the device
of the model and in its dtype.  Sums over edges use ``index_add_``, which is deterministic
on the CPU; on CUDA it is not bitwise reproducible unless
``torch.use_deterministic_algorithms(True)``.  Measured (2-core CPU, float32, no autograd, the
``forcenet_all`` configuration on a 38-atom slab, ~1900 edges): ~95 ms with 2 threads, ~170 ms
with 1 (OCP's original: ~420 ms with 1 thread); without the split, about twice as long.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from forcecalc.graph.batch import Batch
from forcecalc.graph.gather import RowIndex, take_rows
from forcecalc.graph.neighbors import edge_vectors, kept_edges_mask
from forcecalc.models import elements
from forcecalc.replay import candidate_inputs

ACTIVATIONS = (
    "relu",
    "leaky_relu",
    "sp",
    "leaky_sp",
    "elu",
    "leaky_elu",
    "ssp",
    "leaky_ssp",
    "tanh",
    "leaky_tanh",
    "swish",
)

#: Edge bases that need no spherical harmonics.
PLAIN_BASES = ("powersine", "powercosine", "fouriersine", "gauss", "linact", "raw", "rawcat")

ABLATIONS = (
    "none",
    "nofilter",
    "nocond",
    "nodistlist",
    "onlydist",
    "nodelinear",
    "edgelinear",
    "noself",
)


class Activation(nn.Module):
    """OCP's ``Act``: the activation named ``name`` (one of :data:`ACTIVATIONS`).

    The ``leaky_*`` variants add ``slope * x`` (0.05) to the negative side; ``ssp`` is the
    shifted softplus ``softplus(x) - log 2``; ``leaky_relu`` uses torch's default slope 0.01.
    """

    def __init__(self, name: str, slope: float = 0.05) -> None:
        super().__init__()
        if name not in ACTIVATIONS:
            raise ValueError(f"unknown activation {name!r} (known: {', '.join(ACTIVATIONS)})")
        self.name = name
        self.slope = slope
        self.shift = math.log(2.0)

    def extra_repr(self) -> str:
        return self.name

    def forward(self, x: Tensor) -> Tensor:
        name = self.name
        if name == "swish":
            return F.silu(x)  # x * sigmoid(x) in one pass
        if name == "relu":
            return F.relu(x)
        if name == "leaky_relu":
            return F.leaky_relu(x)
        if name == "tanh":
            return torch.tanh(x)
        if name == "leaky_tanh":
            return torch.tanh(x) + self.slope * x
        if name.endswith("elu"):
            out = F.elu(x)
        else:
            out = F.softplus(x)
            if name.endswith("ssp"):
                out = out - self.shift
        if name.startswith("leaky"):
            out = out - self.slope * F.relu(-x)
        return out


# --------------------------------------------------------------------------------------------
# Spherical harmonics


def spherical_harmonic_orders(max_n: int, option: str = "all") -> tuple[list[int], list[int]]:
    """OCP's list of ``(n, m)``: ``n < max_n``, ``0 <= m <= n``, filtered by ``option``.

    ``option``: ``"all"``, ``"sine"`` (odd ``n`` only) or ``"cosine"`` (even ``n`` only).

    Returns:
        ``(degrees, orders)``.
    """
    if option not in ("all", "sine", "cosine"):
        raise ValueError(f"unknown spherical-harmonics option {option!r}")
    pairs = [(n, m) for n in range(max_n) for m in range(n + 1)]
    if option == "sine":
        pairs = [(n, m) for n, m in pairs if n % 2 == 1]
    elif option == "cosine":
        pairs = [(n, m) for n, m in pairs if n % 2 == 0]
    return [n for n, _ in pairs], [m for _, m in pairs]


def real_spherical_harmonics(
    vectors: Tensor, degrees: Sequence[int], orders: Sequence[int]
) -> Tensor:
    """Real and imaginary parts of the complex spherical harmonics ``Y_n^m`` of directions.

    ``Y_n^m`` as in ``scipy.special.sph_harm_y`` (orthonormal, Condon-Shortley phase), of the
    direction of each vector (polar angle from +z, azimuth from +x).  Written as polynomials,
    ``Y_n^m = K_nm * dP_n^m(z) * (x + i y)**m`` for unit ``(x, y, z)``, so no angle is formed:
    smooth and exact at the poles, differentiable, any device or dtype.

    Column layout (OCP's ``SphericalSmearing``): ``Re Y`` of the pairs with ``m == 0``, then
    ``Re Y`` of the pairs with ``m > 0``, then ``Im Y`` of those, each in the order given.

    Args:
        vectors: ``[n, 3]`` nonzero vectors (normalised here).
        degrees: ``n`` of each pair.
        orders: ``m`` of each pair (``0 <= m <= n``).

    Returns:
        ``[n, #(m == 0) + 2 #(m > 0)]``.
    """
    if len(degrees) != len(orders):
        raise ValueError("degrees and orders must have the same length")
    if any(not 0 <= m <= n for n, m in zip(degrees, orders, strict=True)):
        raise ValueError("need 0 <= m <= n for every (n, m)")
    unit = vectors / torch.linalg.norm(vectors, dim=-1, keepdim=True)
    x, y, z = unit.unbind(-1)
    lmax = max(degrees, default=0)
    needed_m = sorted(set(orders))

    # (x + i y)**m = sin(theta)**m * exp(i m phi)
    cos_m, sin_m = [torch.ones_like(x)], [torch.zeros_like(x)]
    for _ in range(max(needed_m, default=0)):
        c, s = cos_m[-1], sin_m[-1]
        cos_m.append(c * x - s * y)
        sin_m.append(s * x + c * y)

    # dP[l, m](z) = P_l^m(z) / sin(theta)**m (Condon-Shortley phase), by the recurrence in l.
    legendre: dict[tuple[int, int], Tensor] = {}
    for m in needed_m:
        double_factorial = math.prod(range(2 * m - 1, 0, -2))
        legendre[m, m] = torch.full_like(z, (-1) ** m * double_factorial)
        if lmax > m:
            legendre[m + 1, m] = (2 * m + 1) * z * legendre[m, m]
        for ell in range(m + 2, lmax + 1):
            legendre[ell, m] = (
                (2 * ell - 1) * z * legendre[ell - 1, m] - (ell + m - 1) * legendre[ell - 2, m]
            ) / (ell - m)

    real_zero, real_pos, imag_pos = [], [], []
    for n, m in zip(degrees, orders, strict=True):
        norm = math.sqrt(
            (2 * n + 1) / (4 * math.pi) * math.factorial(n - m) / math.factorial(n + m)
        )
        radial = norm * legendre[n, m]
        if m == 0:
            real_zero.append(radial)
        else:
            real_pos.append(radial * cos_m[m])
            imag_pos.append(radial * sin_m[m])
    columns = real_zero + real_pos + imag_pos
    if not columns:
        return unit.new_zeros(unit.shape[0], 0)
    return torch.stack(columns, dim=-1)


class SphericalHarmonics(nn.Module):
    """OCP's ``SphericalSmearing``: real spherical harmonics of edge directions (no parameters).

    Args:
        max_n: degrees ``n = 0 .. max_n - 1``, orders ``m = 0 .. n``.
        option: ``"all"``, ``"sine"`` (odd n) or ``"cosine"`` (even n).
    """

    def __init__(self, max_n: int = 3, option: str = "all") -> None:
        super().__init__()
        self.degrees, self.orders = spherical_harmonic_orders(max_n, option)
        self.out_dim = sum(1 if m == 0 else 2 for m in self.orders)

    def forward(self, vectors: Tensor) -> Tensor:
        """``[n, 3] -> [n, out_dim]`` (see :func:`real_spherical_harmonics`)."""
        return real_spherical_harmonics(vectors, self.degrees, self.orders)


# --------------------------------------------------------------------------------------------
# Feature expansions (OCP's ``Basis`` and its smearings)


class FrequencySmearing(nn.Module):
    """``sin`` or ``cos`` of each input feature times ``num_freqs`` frequencies.

    Frequencies ``1.1**k`` (``"power"``, OCP's ``SINESmearing``) or ``k`` (``"fourier"``,
    ``FourierSmearing``), ``k < num_freqs``.  Output column ``k * num_in + i`` is feature ``i``
    at frequency ``k`` (parameter ``freq_filter`` ``[1, num_freqs * num_in]``, not trained).
    """

    def __init__(
        self, num_in: int, num_freqs: int, kind: str = "power", use_cosine: bool = False
    ) -> None:
        super().__init__()
        self.num_freqs = num_freqs
        self.out_dim = num_in * num_freqs
        self.use_cosine = use_cosine
        k = torch.arange(num_freqs, dtype=torch.float32)
        if kind == "power":
            freqs = torch.pow(torch.full_like(k, 1.1), k)
        elif kind == "fourier":
            freqs = k
        else:
            raise ValueError(f"unknown frequency kind {kind!r}")
        self.freq_filter = nn.Parameter(
            freqs.repeat_interleave(num_in).unsqueeze(0), requires_grad=False
        )

    def forward(self, x: Tensor) -> Tensor:
        """``[n, num_in] -> [n, num_freqs * num_in]``."""
        phase = x.repeat(1, self.num_freqs) * self.freq_filter
        return torch.cos(phase) if self.use_cosine else torch.sin(phase)


class UnitGaussianSmearing(nn.Module):
    """Gaussians on [0, 1] applied to each input feature (OCP's ``Basis`` ``"gauss"``).

    Centres ``linspace(0, 1, num_freqs)`` (parameter ``offset`` ``[1, num_freqs * num_in]``,
    column ``k * num_in + i``), width the centre spacing.  The width is a constant, not a
    parameter: like OCP, ``coeff = -0.5 / spacing**2`` from the *float32* centres (a Python
    float; the exact ``1 / (num_freqs - 1)`` would move float64 energies by ~3e-6 eV).
    """

    def __init__(self, num_in: int, num_freqs: int) -> None:
        super().__init__()
        self.num_freqs = num_freqs
        self.out_dim = num_in * num_freqs
        centres = torch.linspace(0.0, 1.0, num_freqs, dtype=torch.float32)
        self.coeff = -0.5 / (centres[1] - centres[0]).item() ** 2
        self.offset = nn.Parameter(
            centres.repeat_interleave(num_in).unsqueeze(0), requires_grad=False
        )

    def forward(self, x: Tensor) -> Tensor:
        """``[n, num_in] -> [n, num_freqs * num_in]``."""
        return torch.exp(self.coeff * (x.repeat(1, self.num_freqs) - self.offset).pow(2))


class Basis(nn.Module):
    """OCP's ``Basis``: expands raw features (node properties or edge features).

    Bases (``basis_type``):

    * ``powersine`` / ``powercosine``: ``sin`` / ``cos`` of ``1.1**k x``; ``fouriersine``:
      ``sin(k x)``; ``gauss``: Gaussians on [0, 1]; ``linact``: ``act(Linear(x))`` of width
      ``num_freqs * num_in``; ``raw`` / ``rawcat``: ``x`` itself.
    * ``sph*`` (edges only; the first three features are the unit direction, the rest
      distances): spherical harmonics ``Y`` of the direction combined with the distances
      ``p``: ``...mul``: ``Y (x) Linear(sin(1.1**k p))`` (outer product, one radial function
      per distance); ``...m40``: the same with 40 radial functions; ``...cat``:
      ``[Y, sin(1.1**k p)]``; ``...nosine``: ``Y (x) p``.
    """

    def __init__(
        self,
        num_in: int,
        num_freqs: int = 50,
        basis_type: str = "powersine",
        activation: str = "ssp",
        sph: SphericalHarmonics | None = None,
    ) -> None:
        super().__init__()
        self.basis_type = basis_type
        self.mode = basis_type
        if "sph" in basis_type:
            if sph is None:
                raise ValueError(f"basis {basis_type!r} needs spherical harmonics")
            modes = [mode for mode in ("cat", "mul", "m40", "nosine") if mode in basis_type]
            if len(modes) != 1:
                raise ValueError(
                    f"spherical basis {basis_type!r} must name exactly one of 'cat', 'mul', "
                    "'m40', 'nosine'"
                )
            self.mode = modes[0]
            num_dist = num_in - 3
            if self.mode != "nosine":
                self.smearing_sine = FrequencySmearing(num_dist, num_freqs)
            if self.mode == "cat":
                self.out_dim = sph.out_dim + self.smearing_sine.out_dim
            elif self.mode in ("mul", "m40"):
                width = num_dist if self.mode == "mul" else 40
                self.lin = nn.Linear(self.smearing_sine.out_dim, width)
                self.out_dim = width * sph.out_dim
            else:
                self.out_dim = num_dist * sph.out_dim
            return
        if basis_type in ("raw", "rawcat"):
            self.out_dim = num_in
            return
        if basis_type == "powersine":
            self.smearing = FrequencySmearing(num_in, num_freqs)
        elif basis_type == "powercosine":
            self.smearing = FrequencySmearing(num_in, num_freqs, use_cosine=True)
        elif basis_type == "fouriersine":
            self.smearing = FrequencySmearing(num_in, num_freqs, kind="fourier")
        elif basis_type == "gauss":
            self.smearing = UnitGaussianSmearing(num_in, num_freqs)
        elif basis_type == "linact":
            self.smearing = nn.Sequential(
                nn.Linear(num_in, num_freqs * num_in), Activation(activation)
            )
        else:
            raise ValueError(
                f"unknown basis {basis_type!r} (known: {', '.join(PLAIN_BASES)} and the "
                "'sph{all,sine,cosine}{mul,cat,m40,nosine}' spherical bases)"
            )
        self.out_dim = num_in * num_freqs

    def forward(self, x: Tensor, harmonics: Tensor | None = None) -> Tensor:
        """``[n, num_in] -> [n, out_dim]``; spherical bases also take ``harmonics`` ``[n, S]``."""
        mode = self.mode
        if mode in ("raw", "rawcat"):
            return x
        if mode not in ("cat", "mul", "m40", "nosine"):
            return self.smearing(x)
        if harmonics is None:
            raise ValueError(f"basis {self.basis_type!r} needs the spherical harmonics")
        distances = x[:, 3:]
        if mode == "cat":
            return torch.cat([harmonics, self.smearing_sine(distances)], dim=1)
        radial = distances if mode == "nosine" else self.lin(self.smearing_sine(distances))
        return (harmonics.unsqueeze(2) * radial.unsqueeze(1)).flatten(1)


# --------------------------------------------------------------------------------------------
# Network


def _xavier_(linear: nn.Linear) -> None:
    nn.init.xavier_uniform_(linear.weight)
    nn.init.zeros_(linear.bias)


class InteractionBlock(nn.Module):
    """One ForceNet message-passing step (OCP's ``InteractionBlock``); returns the update.

    Args:
        hidden: node width ``D``.
        basis_dim: width of the edge basis.
        basis_type: the model's edge basis (``rawcat`` feeds it to ``mlp_edge`` directly,
            every other basis goes through ``lin_basis`` first).
        depth_mlp_edge: hidden layers of the filter MLP (0: Linear + BatchNorm).
        depth_mlp_node: hidden layers of the node MLP (0: Linear + BatchNorm).
        activation: activation name.
        ablation: ``"none"`` or one of OCP's ablations (see :class:`ForceNet`).
    """

    def __init__(
        self,
        hidden: int,
        basis_dim: int,
        basis_type: str,
        depth_mlp_edge: int = 2,
        depth_mlp_node: int = 1,
        activation: str = "ssp",
        ablation: str = "none",
    ) -> None:
        super().__init__()
        self.ablation = ablation
        self.uses_lin_basis = basis_type != "rawcat"
        self.conditioned = ablation != "nocond"
        self.filtered = ablation != "nofilter"
        self.self_message = ablation != "noself"
        act = Activation(activation)

        self.edge_dim = hidden if self.uses_lin_basis else basis_dim
        if self.uses_lin_basis:
            self.lin_basis = nn.Linear(basis_dim, hidden)
        in_features = self.edge_dim + 2 * hidden if self.conditioned else self.edge_dim
        if depth_mlp_edge > 0:
            layers: list[nn.Module] = [nn.Linear(in_features, hidden)]
            for _ in range(depth_mlp_edge):
                layers += [act, nn.Linear(hidden, hidden)]
        else:
            layers = [nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden)]
        self.mlp_edge = nn.Sequential(*layers)

        if self.filtered:
            self.lin = nn.Linear(hidden, hidden)

        if depth_mlp_node > 0:
            layers = [nn.Linear(hidden, hidden)]
            for _ in range(depth_mlp_node):
                layers += [nn.BatchNorm1d(hidden), act, nn.Linear(hidden, hidden)]
        else:
            layers = [nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden)]
        self.mlp_trans = nn.Sequential(*layers)

        if self.self_message:
            self.center_W = nn.Parameter(torch.empty(1, hidden))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """OCP's initialisation: Xavier-uniform weights, zero biases."""
        modules = [*self.mlp_edge, *self.mlp_trans]
        if self.uses_lin_basis:
            modules.append(self.lin_basis)
        if self.filtered:
            modules.append(self.lin)
        for module in modules:
            if isinstance(module, nn.Linear):
                _xavier_(module)
        if self.self_message:
            nn.init.xavier_uniform_(self.center_W)

    def _first_layer(self, h: Tensor, edge_attr: Tensor, source: Tensor, target: Tensor) -> Tensor:
        """``mlp_edge[0]([lin_basis(edge_attr), h[source], h[target]])``, split by blocks."""
        first: nn.Linear = self.mlp_edge[0]
        weight_edge = first.weight[:, : self.edge_dim]
        if self.uses_lin_basis:
            weight = weight_edge @ self.lin_basis.weight
            bias = first.bias + weight_edge @ self.lin_basis.bias
        else:
            weight, bias = weight_edge, first.bias
        out = F.linear(edge_attr, weight, bias)
        if self.conditioned:
            hidden = h.shape[1]
            weight_source = first.weight[:, self.edge_dim : self.edge_dim + hidden]
            weight_target = first.weight[:, self.edge_dim + hidden :]
            out = (
                out
                + take_rows(h @ weight_source.T, source)
                + take_rows(h @ weight_target.T, target)
            )
        return out

    def forward(
        self,
        h: Tensor,
        edge_attr: Tensor,
        source: Tensor,
        target: Tensor,
        edge_weight: Tensor,
    ) -> Tensor:
        """The update of ``h`` ``[n_atoms, D]`` from the edges (source j -> target i):
        ``edge_attr`` ``[n_edges, edge_dim]`` their basis features, ``source``/``target``
        ``[n_edges]`` int64, ``edge_weight`` ``[n_edges]`` the cosine cutoff."""
        layers = self.mlp_edge
        filters = layers[1:](self._first_layer(h, edge_attr, source, target))
        filters = filters * edge_weight.unsqueeze(1)
        if self.filtered:
            x = self.lin(h)
            messages = take_rows(x, source) * filters
        else:
            messages = filters
        out = messages.new_zeros(h.shape[0], messages.shape[1]).index_add_(0, target, messages)
        if not self.filtered:
            out = out + self.center_W
        elif self.self_message:
            out = out + self.center_W * x
        return self.mlp_trans(out)


class FNDecoder(nn.Module):
    """The force decoder (``decoder.decoder``): ``"mlp"`` Linear-BatchNorm-act-Linear, or
    ``"linear"`` Linear, to 3 components."""

    def __init__(self, decoder_type: str, activation: str, width: int) -> None:
        super().__init__()
        if decoder_type == "mlp":
            self.decoder = nn.Sequential(
                nn.Linear(width, width),
                nn.BatchNorm1d(width),
                Activation(activation),
                nn.Linear(width, 3),
            )
        elif decoder_type == "linear":
            self.decoder = nn.Sequential(nn.Linear(width, 3))
        else:
            raise ValueError(f"unknown decoder_type {decoder_type!r} (known: mlp, linear)")
        for module in self.decoder:
            if isinstance(module, nn.Linear):
                _xavier_(module)

    def forward(self, h: Tensor) -> Tensor:
        """``[n_atoms, width] -> [n_atoms, 3]`` forces (normalized units)."""
        return self.decoder(h)


class ForceNet(nn.Module):
    """ForceNet with OCP's parameter names (see the module docstring).

    Keyword arguments are OCP's ``model_attributes`` with OCP's defaults.

    Args:
        hidden_channels: node width.
        num_interactions: message-passing steps.
        cutoff: graph radius (Å).
        feat: ``"full"`` (nine atom properties through the node basis) or ``"simple"``
            (``nn.Embedding(100, hidden)``: elements 1..99).
        num_freqs: frequencies (or Gaussians) per feature of the bases.
        max_n: spherical harmonics of degree ``< max_n``.
        basis: edge basis: ``sph{all,sine,cosine}{mul,cat,m40,nosine}`` (e.g. ``sphallmul``,
            the paper's) or one of :data:`PLAIN_BASES`; the node basis (``feat="full"``) is
            ``powersine`` for the spherical bases and ``basis`` itself otherwise.
        depth_mlp_edge, depth_mlp_node: hidden layers of the filter / node MLPs.
        activation_str, decoder_activation_str: activations (:data:`ACTIVATIONS`).
        ablation: ``"none"`` or one of the paper's ablations: ``nofilter`` (messages are the
            filters), ``nocond`` (filters see the edge only), ``nodistlist`` (only ``d``, no
            radius-corrected distances), ``onlydist`` (no direction; not with spherical bases,
            where the original fails), ``nodelinear`` / ``edgelinear`` (node / filter MLP
            replaced by Linear + BatchNorm), ``noself`` (no self message).
        decoder_hidden_channels: width of the output layer and force decoder.
        decoder_type: ``"mlp"`` or ``"linear"``.
        num_atoms, bond_feat_dim, num_targets, training, otf_graph, use_pbc: accepted for
            OCP compatibility and ignored (the graph always comes from the batch, with each
            system's own pbc).

    Attributes:
        cutoff: graph radius (Å).
        max_neighbors: 50, OCP's hard-coded limit.
        energy_gradient, defines_stress: False (direct forces; no energy derivative).
    """

    energy_gradient = False
    defines_stress = False

    def __init__(
        self,
        hidden_channels: int = 512,
        num_interactions: int = 5,
        cutoff: float = 6.0,
        feat: str = "full",
        num_freqs: int = 50,
        max_n: int = 3,
        basis: str = "sphallmul",
        depth_mlp_edge: int = 2,
        depth_mlp_node: int = 1,
        activation_str: str = "swish",
        ablation: str = "none",
        decoder_hidden_channels: int = 512,
        decoder_type: str = "mlp",
        decoder_activation_str: str = "swish",
        num_atoms: int | None = None,
        bond_feat_dim: int | None = None,
        num_targets: int | None = None,
        training: bool = True,
        otf_graph: bool = False,
        use_pbc: bool = True,
    ) -> None:
        super().__init__()
        del num_atoms, bond_feat_dim, num_targets, training, otf_graph, use_pbc
        if ablation not in ABLATIONS:
            raise ValueError(f"unknown ablation {ablation!r} (known: {', '.join(ABLATIONS)})")
        if feat not in ("full", "simple"):
            raise ValueError(f"unknown feat {feat!r} (known: full, simple)")
        spherical = "sph" in basis
        if spherical and ablation == "onlydist":
            raise ValueError(
                "ablation 'onlydist' with a spherical basis is not supported (OCP's code fails "
                "on it); use a non-spherical basis"
            )
        if not spherical and basis not in PLAIN_BASES:
            raise ValueError(
                f"unknown basis {basis!r} (known: {', '.join(PLAIN_BASES)} and the "
                "'sph{all,sine,cosine}{mul,cat,m40,nosine}' spherical bases)"
            )
        self.cutoff = float(cutoff)
        self.max_neighbors = 50
        self.hidden_channels = hidden_channels
        self.feat = feat
        self.basis_type = basis
        self.ablation = ablation
        if ablation == "edgelinear":
            depth_mlp_edge = 0
        if ablation == "nodelinear":
            depth_mlp_node = 0

        self.atom_radii = nn.Parameter(elements.atomic_radii(), requires_grad=False)
        if feat == "simple":
            # OCP's placeholder table (unused by the network, kept for the state_dict)
            table = torch.linspace(0.0, 1.0, elements.MAX_Z + 1).unsqueeze(1).repeat(1, 9)
            self.atom_map = nn.Parameter(table, requires_grad=False)
            self.embedding = nn.Embedding(100, hidden_channels)
        else:
            self.atom_map = nn.Parameter(elements.normalized_atom_properties(), requires_grad=False)
            node_basis = Basis(
                9, num_freqs, "powersine" if spherical else basis, activation=activation_str
            )
            self.embedding = nn.Sequential(
                node_basis, nn.Linear(node_basis.out_dim, hidden_channels)
            )

        self.harmonics: SphericalHarmonics | None = None
        if spherical:
            option = next((opt for opt in ("all", "sine", "cosine") if f"sph{opt}" in basis), None)
            if option is None:
                raise ValueError(
                    f"spherical basis {basis!r} must start with 'sphall', 'sphsine' or 'sphcosine'"
                )
            self.harmonics = SphericalHarmonics(max_n, option)
        num_edge_features = 4 if ablation in ("nodistlist", "onlydist") else 7
        self.basis_fun = Basis(
            num_edge_features, num_freqs, basis, activation=activation_str, sph=self.harmonics
        )
        self.interactions = nn.ModuleList(
            InteractionBlock(
                hidden_channels,
                self.basis_fun.out_dim,
                basis,
                depth_mlp_edge=depth_mlp_edge,
                depth_mlp_node=depth_mlp_node,
                activation=activation_str,
                ablation=ablation,
            )
            for _ in range(num_interactions)
        )
        self.lin = nn.Linear(hidden_channels, decoder_hidden_channels)
        self.activation = Activation(activation_str)
        self.decoder = FNDecoder(decoder_type, decoder_activation_str, decoder_hidden_channels)
        self.energy_mlp = nn.Linear(decoder_hidden_channels, 1)

    def supported_numbers(self) -> list[int]:
        """Atomic numbers with finite entries in the model's tables (others give NaN)."""
        ok = torch.isfinite(self.atom_radii)
        if self.feat == "full":
            ok = ok & torch.isfinite(self.atom_map).all(dim=1)
        else:
            ok = ok & (torch.arange(len(ok), device=ok.device) < self.embedding.num_embeddings)
        ok[0] = False
        return torch.nonzero(ok).flatten().tolist()

    def graph(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """The model's edges: ``(edge_index [2, E], vectors [E, 3])`` in the model's dtype.

        Keeps the batch's edges with ``0.01 Å < d < cutoff`` and then each atom's 50 closest
        (plus ties, see the module docstring).
        """
        dtype = self.atom_radii.dtype
        vectors = batch.edge_vectors()
        target = batch.edge_index[1]
        incoming = RowIndex(target, batch.n_atoms).inverse
        keep, _ = kept_edges_mask(vectors, target, incoming, self.cutoff, self.max_neighbors)
        index = torch.nonzero(keep).flatten()
        return batch.edge_index[:, index], vectors[index].to(dtype)

    def edge_features(
        self, numbers: Tensor, edge_index: Tensor, vectors: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Edge basis ``[E, B]`` and edge weights ``[E]`` from the edge vectors."""
        source, target = edge_index
        distances = torch.linalg.norm(vectors, dim=1)
        weight = torch.cos(0.5 * distances * math.pi / self.cutoff)
        unit = vectors / distances.unsqueeze(1)
        radius_source = self.atom_radii[numbers[source]]
        radius_target = self.atom_radii[numbers[target]]
        dist = torch.stack(
            [
                distances,
                distances - radius_source,
                distances - radius_target,
                distances - radius_source - radius_target,
            ],
            dim=1,
        )
        dist = dist / self.cutoff
        if self.ablation == "nodistlist":
            dist = dist[:, :1]
        dist = dist.clamp(min=1e-3)
        if self.ablation == "onlydist":
            raw = dist
        else:
            direction = (unit + 1) / 2 if self.basis_type == "gauss" else unit
            raw = torch.cat([direction, dist], dim=1)
        harmonics = None if self.harmonics is None else self.harmonics(unit)
        return self.basis_fun(raw, harmonics), weight

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        """Raw (normalised) outputs: ``energy`` ``[n_systems]``, ``forces`` ``[n_atoms, 3]``."""
        edge_index, vectors = self.graph(batch)
        return self._evaluate(
            batch.numbers, edge_index, vectors, None, batch.system_idx, len(batch.natoms)
        )

    def _evaluate(
        self,
        numbers: Tensor,
        edge_index: Tensor,
        vectors: Tensor,
        edge_mask: Tensor | None,
        system_idx: Tensor,
        n_systems: int,
    ) -> dict[str, Tensor]:
        """The network on the model's edges ``edge_index`` ``[2, E]``, ``vectors`` ``[E, 3]``;
        ``edge_mask`` ``[E]`` (1 or 0, optional) multiplies the edge weights: an edge with 0
        sends zero messages (padding of a fixed-shape graph)."""
        source, target = edge_index
        if self.feat == "full":
            h = self.embedding(self.atom_map[numbers])
        else:
            h = self.embedding(numbers)
        edge_attr, edge_weight = self.edge_features(numbers, edge_index, vectors)
        if edge_mask is not None:
            edge_weight = edge_weight * edge_mask
        for interaction in self.interactions:
            h = h + interaction(h, edge_attr, source, target, edge_weight)
        h = self.activation(self.lin(h))
        pooled = h.new_zeros(n_systems, h.shape[1]).index_add_(0, system_idx, h)
        return {"energy": self.energy_mlp(pooled).squeeze(1), "forces": self.decoder(h)}

    # ------------------------------------------------------------ fixed shapes

    #: :meth:`fixed_shape_forward` is available (forces are direct: no autograd).
    fixed_shapes = True

    def fixed_shape_inputs(
        self, batch: Batch, previous: dict[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """The inputs of :meth:`fixed_shape_forward`: the batch's edges as candidates
        (:func:`~forcecalc.replay.candidate_inputs`, at least ``max_neighbors`` wide and as
        large as ``previous``, inputs built earlier for the same atoms) and ``natoms``
        ``[n_systems]``.  The selection (cutoff, the 50-neighbor rule) happens in the forward,
        so the inputs depend on the positions only through ``inputs["positions"]`` (see
        :meth:`forcecalc.checkpoint.Potential.moved`)."""
        candidates = candidate_inputs(batch, self.max_neighbors, previous)
        return {**candidates, "natoms": batch.natoms}

    def fixed_shape_forward(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Raw ``energy`` and ``forces`` from :meth:`fixed_shape_inputs` (and ``overflow``
        ``[1]``, always False: every candidate has a place), the numbers of :meth:`forward`
        with every shape fixed by the inputs' and no host synchronisation (capturable in a
        CUDA graph).  The graph's selection is a mask on the candidates' edge weights
        (:func:`~forcecalc.graph.neighbors.kept_edges_mask`); masked candidates are evaluated
        along ``x`` and send zero messages.  Inference only."""
        dtype = self.atom_radii.dtype
        edge_index, into = inputs["candidate_index"], inputs["candidates_in"]
        with torch.no_grad():
            vectors = edge_vectors(
                inputs["positions"].to(dtype),
                inputs["cell"].to(dtype),
                inputs["system_idx"],
                edge_index,
                inputs["candidate_shifts"],
            )
            keep, _ = kept_edges_mask(vectors, edge_index[1], into, self.cutoff, self.max_neighbors)
            along_x = (torch.arange(3, device=vectors.device) == 0).to(dtype)
            out = self._evaluate(
                inputs["numbers"],
                edge_index,
                torch.where(keep.unsqueeze(1), vectors, along_x),
                keep.to(dtype),
                inputs["system_idx"],
                len(inputs["natoms"]),
            )
        return {**out, "overflow": torch.zeros(1, dtype=torch.bool, device=vectors.device)}
