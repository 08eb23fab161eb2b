"""The original implementation (OCP's ``ocpmodels`` SpinConv and ForceNet), run from a checkout
of FAIR-Chem/fairchem for timings side by side with ours (``speed.py --original-src DIR``).

Nothing of the original is copied here: it is imported from the checkout's folder ``DIR``
(holding ``ocpmodels/``), at commit ``e7a8745eb``, the one the fixtures were made with and the
last with both models:

    git clone https://github.com/FAIR-Chem/fairchem DIR && git -C DIR checkout e7a8745eb

Its imports need ``torch_geometric``, ``torch_scatter`` (built for the installed torch:
``pip install --no-build-isolation torch_scatter``, 4 minutes on 2 cores), ``pyyaml``,
``matplotlib`` and a scipy that still has ``scipy.special.sph_harm`` (1.17 has not; 1.14.1
works) in the same environment as forcecalc (session 9 used torch 2.13.0+cpu,
torch_geometric 2.8.1, torch_scatter 2.1.2).  The models build their graphs themselves, as
the original calculator ran them (``otf_graph``; ``shared/fixtures/ocp/README.md``), from a
``torch_geometric`` batch of the same structures that our forward gets.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Sequence
from pathlib import Path

import torch
from ase import Atoms

#: The original's class of each of our model kinds (module under ``ocpmodels/models``, class).
CLASSES = {"spinconv": ("spinconv", "spinconv"), "forcenet": ("forcenet", "ForceNet")}


def import_models(src: str | Path) -> dict[str, type]:
    """The original's model classes by our kind, imported from the checkout ``src``.

    ``ocpmodels/models/__init__.py`` imports every model of the repository (and with them
    packages these two do not use), ``ocpmodels/datasets/__init__.py`` every data set format
    (lmdb), so both packages are registered without running them; the modules import what
    they need themselves."""
    root = Path(src).resolve()
    package = root / "ocpmodels" / "models"
    if not package.is_dir():
        raise FileNotFoundError(
            f"{root} holds no ocpmodels/models (a fairchem checkout at e7a8745eb)"
        )
    sys.path.insert(0, str(root))
    importlib.import_module("ocpmodels")
    for name in ("models", "datasets"):
        if f"ocpmodels.{name}" not in sys.modules:
            stub = types.ModuleType(f"ocpmodels.{name}")
            stub.__path__ = [str(root / "ocpmodels" / name)]
            sys.modules[f"ocpmodels.{name}"] = stub
    return {
        kind: getattr(importlib.import_module(f"ocpmodels.models.{module}"), name)
        for kind, (module, name) in CLASSES.items()
    }


def build(classes: dict[str, type], kind: str, kwargs: dict) -> torch.nn.Module:
    """The original ``kind`` model with our configuration ``kwargs`` (the same keyword names
    as OCP's ``model_attributes``), building its graph on the fly and predicting forces, in
    evaluation mode."""
    options = {"num_atoms": None, "bond_feat_dim": None, "num_targets": 1, "otf_graph": True}
    if kind == "spinconv":
        options |= {"regress_forces": True, "use_pbc": True}
    return classes[kind](**options, **kwargs).eval()


def batch(atoms_list: Sequence[Atoms], device: str | torch.device) -> object:
    """A ``torch_geometric`` batch of ``atoms_list`` with the fields the original models read:
    float32 positions, atomic numbers, cells ``[n_systems, 3, 3]``, atom counts, tags and
    per-axis periodicity."""
    from torch_geometric.data import Batch, Data

    data = [
        Data(
            pos=torch.tensor(atoms.positions, dtype=torch.float32),
            atomic_numbers=torch.tensor(atoms.numbers, dtype=torch.float32),
            cell=torch.tensor(atoms.cell.array, dtype=torch.float32).view(1, 3, 3),
            natoms=len(atoms),
            tags=torch.tensor(atoms.get_tags(), dtype=torch.long),
            pbc=torch.tensor(atoms.pbc).view(1, 3),
        )
        for atoms in atoms_list
    ]
    return Batch.from_data_list(data).to(device)
