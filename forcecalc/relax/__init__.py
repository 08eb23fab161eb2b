"""Batched relaxation and molecular dynamics of many structures on one device.

* :func:`relax`: FIRE, LBFGS or BFGS, each system with its own optimizer state reproducing
  ASE's optimizer of the same name, with in-flight batching (converged structures leave, queued
  ones enter), per-system neighbor-list reuse with a skin, an automatic batch size from a
  memory model and a split-and-continue fallback on out-of-memory errors.
* :func:`md`: velocity Verlet (NVE) and Langevin (NVT) for many independent systems,
  reproducing ASE's integrators per system.
* :func:`shard` / :func:`merge_shards` / :func:`parse_shard`: deterministic splitting of a
  screening over machines.

Example::

    from forcecalc.relax import relax, md

    relaxed = relax(structures, "spinconv-ec", optimizer="bfgs", fmax=0.05, steps=300)
    for atoms in relaxed:
        print(atoms.info["relax_steps"], atoms.info["relax_converged"],
              atoms.get_potential_energy())

    # screening on 8 machines: machine k (0-based) relaxes shard(structures, k, 8), and
    # merge_shards([out_0, ..., out_7], n_items=len(structures)) restores the input order

Note: ``forcecalc.relax`` *the attribute of the package* is the function :func:`relax`
(exported by ``forcecalc/__init__``); import from this subpackage with
``from forcecalc.relax import ...``.
"""

from forcecalc.relax.dynamics import md
from forcecalc.relax.memory import MemoryModel, fit_memory_model, is_out_of_memory
from forcecalc.relax.optimizers import BFGS, FIRE, LBFGS
from forcecalc.relax.relaxation import relax
from forcecalc.relax.sharding import merge_shards, parse_shard, shard, shard_indices

__all__ = [
    "BFGS",
    "FIRE",
    "LBFGS",
    "MemoryModel",
    "fit_memory_model",
    "is_out_of_memory",
    "md",
    "merge_shards",
    "parse_shard",
    "relax",
    "shard",
    "shard_indices",
]
