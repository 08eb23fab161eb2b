"""The periodic lattice of a cell, as a neighbor search sees it: plane spacings, the periodic
images a cutoff reaches, and a reduced basis for cells given in a bad one.

A neighbor search under pbc visits every periodic image within the cutoff: about
``2 cutoff / spacing + 1`` per periodic axis, ``spacing`` the distance between the lattice
planes of that axis.  For a sound cell in a sound basis that is a few hundred images at most;
a cell given in a strongly skewed basis (``b + 40000 a`` for ``b``) has tiny plane spacings
in that basis but not in a reduced one (the same lattice); a nearly flat cell (``c`` almost in
the plane of ``a`` and ``b``) has tiny spacings in every basis, and a lattice vector so short
that every atom overlaps its own periodic image.  :func:`search_lattice` tells these apart
before any search: it reduces the bases that need it and refuses the lattices no basis helps.
"""

from __future__ import annotations

import itertools

import numpy as np

#: A search whose cells need more periodic images per atom than this (in their given
#: basis) is made in a reduced basis of the same lattice.
REDUCE_ABOVE_IMAGES = 1e4
#: Lattices that need more images per atom than this even in a reduced basis are refused:
#: their planes are far closer than any bond (a nearly flat cell, or a cell in Bohr or nm).
MAX_IMAGES = 1e6
#: A lattice vector shorter than this (Å) puts every atom on its own periodic image (the
#: models' overlap distance, ``sqrt(MIN_DISTANCE_SQ)`` of :mod:`forcecalc.graph.neighbors`).
MIN_LATTICE_VECTOR = 0.01


def plane_spacings(cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """``[n_systems, 3]`` the distance between the lattice planes of each periodic axis
    (within the span of the periodic vectors; ``inf`` on open axes).

    Args:
        cell: ``[n_systems, 3, 3]`` cell vectors (rows), periodic ones independent.
        pbc: ``[n_systems, 3]`` bool.
    """
    periodic = cell * pbc[..., None]
    gram = periodic @ periodic.transpose(0, 2, 1)
    system, axis = np.nonzero(~pbc)
    gram[system, axis, axis] = 1.0  # open rows are zero: the identity there
    dual = np.linalg.inv(gram) @ periodic  # rows: the dual vectors within the periodic span
    norms = np.linalg.norm(dual, axis=2)
    return np.where(pbc, 1.0 / np.where(pbc, norms, 1.0), np.inf)


def images_per_atom(spacings: np.ndarray, cutoff: float) -> np.ndarray:
    """``[n_systems]`` the periodic images of an atom a search within ``cutoff`` visits:
    ``prod(2 ceil(cutoff / spacing) + 1)`` over periodic axes (as floats: no overflow)."""
    per_axis = 2.0 * np.ceil(cutoff / spacings) + 1.0  # 1 on open axes (spacing inf)
    return per_axis.prod(axis=1)


def reduced_basis(vectors: np.ndarray, delta: float = 0.99, max_swaps: int = 10_000) -> np.ndarray:
    """``[k, k]`` int64 unimodular ``U`` with ``U @ vectors`` an LLL-reduced basis (Lovász
    constant ``delta``) of the lattice of ``vectors`` ``[k, 3]`` (independent, ``k <= 3``):
    short, nearly orthogonal vectors; the first within a factor 2 of the shortest lattice
    vector for ``k = 3``.  Each reduced vector is recomputed from the integer basis, so no
    rounding accumulates; ``max_swaps`` only bounds pathological inputs (any ``U`` is a basis).
    """
    k = len(vectors)
    basis = np.eye(k, dtype=np.int64)
    i, swaps = 1, 0
    while i < k and swaps < max_swaps:
        for j in range(i - 1, -1, -1):
            ortho, mu = _gram_schmidt(basis @ vectors)
            multiple = int(np.rint(mu[i, j]))
            if multiple:
                basis[i] -= multiple * basis[j]
        ortho, mu = _gram_schmidt(basis @ vectors)
        norms = (ortho * ortho).sum(axis=1)
        if norms[i] >= (delta - mu[i, i - 1] ** 2) * norms[i - 1]:
            i += 1
        else:
            basis[[i - 1, i]] = basis[[i, i - 1]]
            i, swaps = max(i - 1, 1), swaps + 1
    return basis


def _gram_schmidt(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The Gram-Schmidt vectors ``[k, 3]`` of ``vectors`` and the coefficients ``mu``
    ``[k, k]`` (``mu[i, j] = <v_i, o_j> / <o_j, o_j>``)."""
    k = len(vectors)
    ortho, mu = np.zeros_like(vectors), np.zeros((k, k))
    for i in range(k):
        ortho[i] = vectors[i]
        for j in range(i):
            mu[i, j] = vectors[i] @ ortho[j] / (ortho[j] @ ortho[j])
            ortho[i] = ortho[i] - mu[i, j] * ortho[j]
    return ortho, mu


def shortest_vector(vectors: np.ndarray) -> tuple[float, np.ndarray]:
    """The shortest of the lattice vectors ``n @ vectors`` with integer ``n`` in
    ``[-2, 2]^k`` (not all zero), and its ``n``: the shortest lattice vector, for a reduced
    basis ``vectors`` ``[k, 3]``."""
    k = len(vectors)
    coefficients = np.array(
        [n for n in itertools.product(range(-2, 3), repeat=k) if any(n)], dtype=np.float64
    )
    lengths = np.linalg.norm(coefficients @ vectors, axis=1)
    best = int(lengths.argmin())
    return float(lengths[best]), coefficients[best].astype(np.int64)


def search_lattice(
    cell: np.ndarray, pbc: np.ndarray, cutoff: float
) -> tuple[np.ndarray | None, tuple[int, str] | None]:
    """How to search the neighbors of every system within ``cutoff``: the ``[n_systems, 3,
    3]`` int64 unimodular ``basis`` to search in (``basis @ cell``, the same lattice; the
    identity for systems whose cell is fine as it is; ``None`` when every cell is), and the
    first system whose lattice no basis makes searchable, with what is wrong with it
    (``None`` if none): a lattice vector shorter than :data:`MIN_LATTICE_VECTOR`, or more
    than :data:`MAX_IMAGES` images per atom.

    Args:
        cell: ``[n_systems, 3, 3]`` float64 cell vectors (rows), periodic ones independent.
        pbc: ``[n_systems, 3]`` bool.
        cutoff: the search radius (Å).
    """
    spacings = plane_spacings(cell, pbc)
    # a lattice vector is at least as long as the smallest plane spacing
    crowded = np.flatnonzero(
        (images_per_atom(spacings, cutoff) > REDUCE_ABOVE_IMAGES)
        | (spacings.min(axis=1) < MIN_LATTICE_VECTOR)
    )
    if not len(crowded):
        return None, None
    basis = np.tile(np.eye(3, dtype=np.int64), (len(cell), 1, 1))
    for s in crowded.tolist():
        axes = np.flatnonzero(pbc[s])
        reduction = reduced_basis(cell[s, axes])
        basis[s][np.ix_(axes, axes)] = reduction
        lattice = reduction @ cell[s, axes]
        length, n = shortest_vector(lattice)
        if length < MIN_LATTICE_VECTOR:
            vector = n @ reduction
            vector = (vector if vector[np.flatnonzero(vector)[0]] > 0 else -vector).tolist()
            return basis, (
                s,
                f"the cell has a lattice vector of {length:.3g} Å ({_combination(vector, axes)}): "
                "every atom overlaps its own periodic images (a cell vector of almost no "
                "length, or nearly dependent cell vectors?)",
            )
        reduced_spacings = plane_spacings((basis[s] @ cell[s])[None], pbc[s][None])
        needed = float(images_per_atom(reduced_spacings, cutoff)[0])
        if needed > MAX_IMAGES:
            spacing = float(reduced_spacings.min())
            return basis, (
                s,
                f"the cell's lattice planes are only {spacing:.3g} Å apart, so a neighbor search "
                f"within {cutoff:g} Å would visit {needed:.3g} periodic images of each atom "
                f"(more than {MAX_IMAGES:.0e}): a nearly flat cell, or a cell in other units "
                "than Å?",
            )
    return basis, None


def _combination(coefficients: list[int], axes: np.ndarray) -> str:
    """``"2a - b + c"``-style text of an integer combination of the periodic cell vectors."""
    text = ""
    for axis, n in zip(axes.tolist(), coefficients, strict=True):
        if n:
            term = ("" if abs(n) == 1 else str(abs(n))) + "abc"[axis]
            if text:
                text += f" {'-' if n < 0 else '+'} {term}"
            else:
                text = f"{'-' if n < 0 else ''}{term}"
    return text
