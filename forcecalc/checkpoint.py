"""Checkpoints: OCP's format and ours, normalizers, and the model wrapper with physical units.

Two formats are read:

* **OCP** (what the Open Catalyst Project's trainer saved): a dict with ``state_dict`` (keys
  prefixed ``module.`` once or twice), ``config["model"]`` (``"spinconv"`` / ``"forcenet"``),
  ``config["model_attributes"]`` (the constructor's keyword arguments; or, as fairchem writes
  it, ``config["model"]`` a dict ``{"name", **options}``) and ``normalizers``
  ``{"target": {"mean", "std"}, "grad_target": {"mean", "std"}}`` (or fairchem's ``energy``
  and ``forces``, the deviation ``rmsd``), applied by OCP's rule (:func:`_ocp_normalizers`).
* **forcecalc**: one dict ``{"format": "forcecalc", "format_version", "model", "model_kwargs",
  "state_dict", "normalizers": {"energy_mean", "energy_std", "forces_std"}, "elements",
  "cutoff", "metadata"}`` written by :func:`save_checkpoint`.

Both load with ``torch.load(weights_only=True)``; a torch file that needs unsafe unpickling
is refused unless the caller passes ``allow_unsafe=True``, and a file that is no torch file
(or a truncated or corrupt one) is reported as such, with or without it.  A zip-format file
is checked against the CRC-32s its archive stores first (``torch.load`` does not check them).
"""

from __future__ import annotations

import datetime
import functools
import inspect
import math
import os
import pickle
import pickletools
import re
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from forcecalc.atomic import torch_save
from forcecalc.graph import Batch
from forcecalc.graph.batch import MAX_ATOMIC_NUMBER
from forcecalc.models.interface import FixedShapeModel, Model, missing_members
from forcecalc.models.registry import build_model, model_class, model_names
from forcecalc.warning import warn

FORMAT = "forcecalc"
FORMAT_VERSION = 1
#: The ``format`` of a training run's state (``checkpoint.pt``; see forcecalc.train).
TRAINING_STATE_FORMAT = "forcecalc-train-state"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


@dataclass(frozen=True)
class Normalizers:
    """Affine maps from the model's raw outputs to eV and eV/Å: ``E = raw * std + mean``,
    plus, where ``element_references`` are given (``(Z, eV)`` pairs), the sum of the atoms'
    reference energies: for total energies, which grow with the number of atoms (OC20's
    adsorption energies have none: the mean is per structure).  The means must be finite and
    the deviations finite and positive (``ValueError`` otherwise)."""

    energy_mean: float = 0.0
    energy_std: float = 1.0
    forces_std: float = 1.0
    element_references: tuple[tuple[int, float], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "energy_mean": self.energy_mean,
            "energy_std": self.energy_std,
            "forces_std": self.forces_std,
        }
        if self.element_references:
            out["element_references"] = [[z, e] for z, e in self.element_references]
        return out

    def __post_init__(self) -> None:
        """Refuse (``ValueError`` naming the field) a mean that is not finite, a standard
        deviation that is not finite and positive, and invalid element references."""
        for name in ("energy_mean", "energy_std", "forces_std"):
            value = getattr(self, name)
            positive = name != "energy_mean"
            if not math.isfinite(value) or (positive and value <= 0):
                wanted = "a finite number > 0" if positive else "a finite number"
                raise ValueError(f"normalizer {name} must be {wanted}, got {value!r}")
        zs = [z for z, _ in self.element_references]
        bad = [
            (z, e)
            for z, e in self.element_references
            if not 1 <= z <= MAX_ATOMIC_NUMBER or not math.isfinite(e)
        ]
        if bad or len(set(zs)) != len(zs):
            raise ValueError(
                "element_references must be (Z, eV) pairs with distinct Z in 1..118 and finite "
                f"energies, got {list(self.element_references)}"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Normalizers:
        """The inverse of :meth:`as_dict` (``ValueError``/``TypeError`` for other values)."""
        references = tuple((int(z), _float(e)) for z, e in values.get("element_references", ()))
        scalars = {k: _float(v) for k, v in values.items() if k != "element_references"}
        return cls(**scalars, element_references=references)

    def reference_energy(self, numbers: Tensor, system_idx: Tensor, n_systems: int) -> Tensor:
        """``[n_systems]`` float64: the sum of each system's atoms' reference energies
        (zero without references; NaN for a system with an element that has none, so that
        no path gives a number for it); ``numbers`` ``[n_atoms]``, ``system_idx``
        ``[n_atoms]``."""
        out = torch.zeros(n_systems, dtype=torch.float64, device=numbers.device)
        if not self.element_references:
            return out
        table = torch.full(
            (MAX_ATOMIC_NUMBER + 1,), torch.nan, dtype=torch.float64, device=numbers.device
        )
        for z, energy in self.element_references:
            table[z] = energy
        return out.index_add_(0, system_idx, table[numbers])

    def missing_references(self, numbers: Sequence[int]) -> list[int]:
        """The atomic numbers among ``numbers`` without a reference energy (none when the
        normalizers have no references at all)."""
        if not self.element_references:
            return []
        known = {z for z, _ in self.element_references}
        return sorted({int(z) for z in numbers} - known)


@dataclass
class CheckpointInfo:
    """What a checkpoint says about itself, besides the weights."""

    model: str
    model_kwargs: dict[str, Any]
    normalizers: Normalizers
    source_format: str
    elements: list[int] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    path: str | None = None


def element_symbols(numbers: Iterable[int]) -> list[str]:
    """The chemical symbols of the distinct atomic ``numbers``, by number (the number itself
    where ASE has no symbol)."""
    from ase.data import chemical_symbols

    return [
        chemical_symbols[z] if 0 <= z < len(chemical_symbols) else str(z)
        for z in sorted(set(numbers))
    ]


class Potential(nn.Module):
    """A model with its normalizers: a :class:`~forcecalc.graph.Batch` in, eV and Å out.

    Outputs of :meth:`forward`: ``energy`` ``[n_systems]`` (eV), ``forces`` ``[n_atoms, 3]``
    (eV/Å) and, when asked for and defined by the model, ``stress`` ``[n_systems, 3, 3]``
    (eV/Å^3, ``(1/V) dE/dstrain``).
    """

    def __init__(self, model: Model, info: CheckpointInfo) -> None:
        super().__init__()
        missing = missing_members(model)
        if missing:
            raise TypeError(
                f"{type(model).__name__} is not a forcecalc model: it lacks "
                f"{', '.join(missing)} (see forcecalc.models.interface.Model)"
            )
        self.model = model
        self.info = info
        self._fixed_shape_model = isinstance(model, FixedShapeModel)  # 20 us: checked once

    @property
    def name(self) -> str:
        return self.info.model

    @property
    def cutoff(self) -> float:
        return float(self.model.cutoff)

    @property
    def max_neighbors(self) -> int | None:
        return self.model.max_neighbors

    @property
    def energy_gradient(self) -> bool:
        """Whether the forces are the energy's gradient (by autograd: an energy-centric
        model), so that a forward needs gradients enabled."""
        return bool(self.model.energy_gradient)

    @property
    def defines_stress(self) -> bool:
        """Whether the model gives a stress: the strain derivative of its energy."""
        return bool(self.model.defines_stress)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def elements(self) -> list[int] | None:
        """Atomic numbers the model accepts: the checkpoint's list (which fine-tuning extends),
        else those its tables cover (``None``: every element)."""
        if self.info.elements is not None:
            return self.info.elements
        return self.table_elements

    @functools.cached_property
    def table_elements(self) -> list[int] | None:
        """Atomic numbers the model's tables cover (its ``supported_numbers()``; ``None``: every
        element), read once (from its tables on its device: a host
        synchronisation per call on a GPU, ~1 ms of every ASE step)."""
        supported = self.model.supported_numbers()
        return None if supported is None else list(supported)

    def check_same(
        self, device: str | torch.device | None, dtype: str | torch.dtype | None
    ) -> None:
        """Raise ``ValueError`` if ``device`` or ``dtype`` (when given) are not this loaded
        model's: a caller would otherwise run on another device or precision than asked for."""
        if dtype is not None and resolve_dtype(dtype) != self.dtype:
            raise ValueError(
                f"dtype={str(dtype)!r}, but the loaded Potential is {self.dtype}: convert "
                "it (potential.to(dtype)) or pass the checkpoint's path or name"
            )
        if device is not None:
            wanted_device, have = torch.device(device), self.device
            if wanted_device.type != have.type or (
                wanted_device.index is not None and wanted_device.index != have.index
            ):
                raise ValueError(
                    f"device={str(device)!r}, but the loaded Potential is on {have}: move it "
                    "(potential.to(device)) or pass the checkpoint's path or name"
                )

    def check_elements(self, structures: Sequence[Any]) -> None:
        """:meth:`check_numbers` for each of ``structures`` (``ase.Atoms``), its error naming
        the structure by index and formula."""
        for index, atoms in enumerate(structures):
            try:
                self.check_numbers(torch.as_tensor(atoms.numbers))
            except ValueError as error:
                raise ValueError(
                    f"structure {index} ({atoms.get_chemical_formula()}): {error}"
                ) from None

    def check_numbers(self, numbers: Tensor) -> None:
        """Raise ``ValueError`` naming the atoms whose element the model cannot represent (or
        has no reference energy for, where its normalizers have references)."""
        references = self.info.normalizers.element_references
        missing = self.info.normalizers.missing_references(numbers.tolist()) if references else []
        if missing:
            raise ValueError(
                f"the {self.name} model has no reference energy for element(s) "
                f"{', '.join(element_symbols(missing))} (its energies are total "
                "energies referenced per element)"
            )
        allowed = self.elements
        if allowed is None:
            return
        allowed_t = torch.as_tensor(allowed, device=numbers.device)
        bad = torch.nonzero(~torch.isin(numbers, allowed_t)).flatten()
        if len(bad):
            symbols = element_symbols(numbers[bad].tolist())
            raise ValueError(
                f"the {self.name} model has no parameters for element(s) {', '.join(symbols)} "
                f"(atoms {bad[:10].tolist()})"
            )

    def forward(self, batch: Batch, compute_stress: bool = False) -> dict[str, Tensor]:
        if compute_stress and not self.defines_stress:
            raise NotImplementedError(f"the {self.name} model ({self._kind()}) defines no stress")
        raw = (
            self.model(batch, compute_stress=compute_stress)
            if compute_stress
            else self.model(batch)
        )
        return self._denormalized(raw, self._reference(batch))

    def _reference(self, batch: Batch) -> Tensor | None:
        """``[n_systems]`` summed element reference energies of ``batch`` (None without)."""
        norm = self.info.normalizers
        if not norm.element_references:
            return None
        return norm.reference_energy(batch.numbers, batch.system_idx, batch.n_systems)

    @property
    def fixed_shapes(self) -> bool:
        """Whether the model has a fixed-shape forward (:meth:`fixed_shape_forward`)."""
        return self._fixed_shape_model and bool(self.model.fixed_shapes)

    def fixed_shape_inputs(
        self, batch: Batch, previous: dict[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """The model's ``fixed_shape_inputs``, at least as large as ``previous`` (inputs built
        earlier for the same atoms; see
        :meth:`forcecalc.models.spinconv.SpinConv.fixed_shape_inputs`); a clear error for a
        model without a fixed-shape forward."""
        if not self.fixed_shapes:
            raise ValueError(
                f"the {self.name} model ({self._kind()}) has no fixed-shape forward (CUDA graphs)"
            )
        inputs = self.model.fixed_shape_inputs(batch, previous)
        reference = self._reference(batch)
        if reference is not None:  # constant while the atoms move (same numbers)
            inputs["energy_reference"] = reference
        return inputs

    @staticmethod
    def moved(inputs: dict[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        """:meth:`fixed_shape_inputs` for ``batch``, given those of the same atoms with the
        same edges (numbers, cell, pbc and neighbor list unchanged) at other positions: the
        models' fixed-shape inputs depend on the positions only through ``positions``."""
        return {**inputs, "positions": batch.positions.to(torch.float64)}

    def fixed_shape_forward(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """``energy`` (eV), ``forces`` (eV/Å) and, for a model that defines it, ``stress``
        (eV/Å^3) of :meth:`fixed_shape_inputs`, the same as :meth:`forward`, with fixed shapes
        and no host synchronisation (capturable in a CUDA graph:
        :class:`forcecalc.replay.GraphReplay`); and ``overflow`` ``[1]`` bool: True when the
        inputs had too little room for the edges kept at these positions (the other outputs
        are then wrong: build the inputs again from this batch), and the model's ``cut`` where
        it has one (SpinConv with the envelope)."""
        raw = self.model.fixed_shape_forward(inputs)
        reference = inputs.get("energy_reference")
        flags = {key: raw[key] for key in ("overflow", "cut") if key in raw}
        return {**self._denormalized(raw, reference), **flags}

    def _denormalized(
        self, raw: dict[str, Tensor], reference: Tensor | None = None
    ) -> dict[str, Tensor]:
        """eV and Å from the raw outputs; ``reference`` ``[n_systems]``: the systems' summed
        element reference energies, if the normalizers have them; the energy is then float64
        (a float32 sum of hundreds of eV would carry ~1e-5 eV of rounding)."""
        norm = self.info.normalizers
        energy = raw["energy"] * norm.energy_std + norm.energy_mean
        if reference is not None:
            energy = energy.to(torch.float64) + reference
        out = {
            "energy": energy,
            "forces": raw["forces"] * norm.forces_std,
        }
        if "stress" in raw:
            out["stress"] = raw["stress"] * norm.energy_std
        return out

    def _kind(self) -> str:
        estimator = self.info.model_kwargs.get("force_estimator")
        if estimator == "random":
            return "force-centric: direct forces, no energy gradient"
        if estimator is None:
            return "direct forces"
        if self.energy_gradient and not self.defines_stress:
            return "forces='compat', a partial derivative: stress needs forces='conservative'"
        return f"force_estimator={estimator}"


def _strip_module_prefix(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    stripped = {}
    for key, value in state_dict.items():
        while key.startswith("module."):
            key = key[len("module.") :]
        stripped[key] = value
    return stripped


#: How a file in torch's legacy (not zip) format begins: its magic number, pickled.
_LEGACY_HEADERS = tuple(
    pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=protocol)
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1)
)


#: What ``torch.load`` raises for a file that is not a checkpoint; unsafe unpickling of junk
#: can also fail to import or call what it names.
_LOAD_ERRORS = (
    pickle.UnpicklingError,
    RuntimeError,
    EOFError,
    OSError,
    ValueError,
    ImportError,
    AttributeError,
    KeyError,
    IndexError,
    TypeError,
)


def is_torch_file(path: Path) -> bool:
    """Whether ``path`` has the layout ``torch.save`` writes: a zip archive with one
    ``data.pkl`` record that is a well-formed pickle, or the legacy format's magic number.
    Parses the pickle's opcodes only: nothing is unpickled."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.rsplit("/", 1)[-1] == "data.pkl"]
                if len(names) != 1:
                    return False
                for _ in pickletools.genops(archive.read(names[0])):
                    pass
                return True
        with path.open("rb") as stream:
            head = stream.read(max(len(header) for header in _LEGACY_HEADERS))
        return head.startswith(_LEGACY_HEADERS)
    except (OSError, EOFError, ValueError, RuntimeError, NotImplementedError, zipfile.BadZipFile):
        return False


def _damaged_record(path: Path) -> str | None:
    """The first record of a zip-format torch file whose bytes do not match the CRC-32 its
    archive stores (``torch.load`` does not check them: bytes zeroed or flipped inside a
    tensor load silently as wrong weights); None for an intact archive, a file that is no zip
    archive (torch's legacy format has no checksums; ``torch.load`` reports junk), and an
    archive whose writer stored no checksums (every non-empty record's CRC-32 0:
    ``torch.serialization.set_crc32_options(False)``).  Reads the whole file once."""
    try:
        if not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as archive:
            if all(info.CRC == 0 for info in archive.infolist() if info.file_size):
                return None
            return archive.testzip()
    except (
        OSError,
        EOFError,
        ValueError,
        RuntimeError,
        NotImplementedError,
        zipfile.BadZipFile,
        zlib.error,
    ):
        return None


def _reason(error: BaseException) -> str:
    """The gist of a ``torch.load`` error: torch's weights-only unpickler's own message
    rather than the advice around it; its first sentence, at most 200 characters."""
    message = str(error).split("WeightsUnpickler error:", 1)[-1]
    message = re.sub(r"\[enforce fail at [^\]]*\][\s.]*", "", message)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if lines:
        return lines[0].split(". ", 1)[0][:200]
    return "the file ends early" if isinstance(error, EOFError) else type(error).__name__


def read_torch_file(
    path: Path,
    allow_unsafe: bool = False,
    unsafe_hint: str = "if you trust its source, load it with allow_unsafe=True (CLI: "
    "--allow-unsafe)",
) -> Any:
    """What ``torch.load`` reads from ``path`` (on the CPU); a missing, truncated or foreign
    file is a :class:`CheckpointError` naming it and the problem (``unsafe_hint``: what to
    do about a file that only unsafe unpickling can load)."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    damaged = _damaged_record(path)
    if damaged is not None:
        raise CheckpointError(
            f"checkpoint {path} is damaged: its record {damaged!r} does not match the CRC-32 "
            "checksum its archive stores (an incomplete download or copy, or a disk error); "
            "download or copy it again"
        )
    try:
        data = torch.load(path, map_location="cpu", weights_only=not allow_unsafe)
    except _LOAD_ERRORS as error:
        if is_torch_file(path):
            if isinstance(error, pickle.UnpicklingError) and not allow_unsafe:
                raise CheckpointError(
                    f"checkpoint {path} contains Python objects that only unsafe unpickling "
                    f"can load ({_reason(error)}); {unsafe_hint}"
                ) from None
            if isinstance(error, (ImportError, AttributeError)):
                raise CheckpointError(
                    f"checkpoint {path} holds Python objects whose code cannot be imported "
                    f"here ({_reason(error)}); install the package that wrote it"
                ) from None
        detail = (
            _reason(error)
            if is_torch_file(path)
            else "not a zip archive with one data.pkl record, nor torch's legacy format"
        )
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (or is truncated/corrupt): {detail}"
        ) from None
    return data


def _read(path: Path, allow_unsafe: bool) -> dict[str, Any]:
    """The model checkpoint at ``path``: :func:`read_torch_file`, a dict with a state dict."""
    data = read_torch_file(path, allow_unsafe)
    if isinstance(data, dict) and data.get("format") == TRAINING_STATE_FORMAT:
        raise CheckpointError(
            f"{path} is the state of a training run (to resume it: --resume), not a model "
            "checkpoint: use the run's best.pt or final.pt (a run stopped before it wrote "
            "them: resume it with --max-steps at its current step, which writes final.pt)"
        )
    if not isinstance(data, dict) or "state_dict" not in data:
        raise CheckpointError(
            f"checkpoint {path} is not a model checkpoint: expected a dict with a 'state_dict'"
        )
    if not isinstance(data["state_dict"], dict):
        raise CheckpointError(
            f"checkpoint {path}: its 'state_dict' is a {type(data['state_dict']).__name__}, "
            "not a dict of tensors"
        )
    return data


def _float(value: Any) -> float:
    return float(value.item() if isinstance(value, Tensor) else value)


def _ocp_info(data: dict[str, Any], path: Path) -> CheckpointInfo:
    """What an OCP-format checkpoint says about itself: model, options, normalizers and, as
    metadata, its training config and validation metrics."""
    config = data.get("config")
    if not isinstance(config, dict) or "model" not in config:
        raise CheckpointError(
            f"checkpoint {path} has neither forcecalc's 'format' key nor OCP's "
            "config['model']: unknown checkpoint layout"
        )
    model, kwargs = _ocp_model(config, path)
    normalizers = _ocp_normalizers(data, config, bool(kwargs.get("regress_forces", True)), path)
    if model == "spinconv":
        # OCP checkpoints give OCP's numbers: the original's force definition by default.
        kwargs.setdefault("forces", "compat")
    metadata = {key: config[key] for key in ("task", "optim", "dataset", "cmd") if key in config}
    metadata.update({k: data[k] for k in ("epoch", "step", "val_metrics") if k in data})
    return CheckpointInfo(
        model=model,
        model_kwargs=kwargs,
        normalizers=normalizers,
        source_format="ocp",
        metadata=metadata,
    )


def _ocp_model(config: dict[str, Any], path: Path) -> tuple[str, dict[str, Any]]:
    """The model name and options of an OCP config: ``config["model"]`` the name and
    ``config["model_attributes"]`` the options (OCP's layout), or ``config["model"]`` a dict
    ``{"name": ..., **options}`` (fairchem's), merged with ``model_attributes`` where both
    are given (a key they give different values is an error)."""
    model = config["model"]
    options: dict[str, Any] = {}
    if isinstance(model, dict):
        if not isinstance(model.get("name"), str):
            raise CheckpointError(
                f"checkpoint {path}: config['model'] is a dict without a 'name' string "
                f"(keys {sorted(map(str, model))})"
            )
        options = {key: value for key, value in model.items() if key != "name"}
        model = model["name"]
    elif config.get("model_attributes") is None:
        raise CheckpointError(
            f"checkpoint {path} lacks config['model_attributes'] (the {model} model's "
            "options) and config['model'] is no dict of them: the model it holds cannot be built"
        )
    attributes = _dict_entry(config, "model_attributes", path, "config['model_attributes']")
    conflicts = sorted(
        key for key in options.keys() & attributes.keys() if options[key] != attributes[key]
    )
    if conflicts:
        raise CheckpointError(
            f"checkpoint {path}: config['model'] and config['model_attributes'] give different "
            f"values for {', '.join(map(repr, conflicts))}"
        )
    return str(model), {**options, **attributes}


#: The keys of a saved OCP normalizer and the role each plays: OCP's ``target`` (energy) and
#: ``grad_target`` (forces), fairchem's ``energy`` and ``forces``.
_NORMALIZER_ROLES = {
    "target": "target",
    "energy": "target",
    "grad_target": "grad_target",
    "forces": "grad_target",
}


def _ocp_normalizers(
    data: dict[str, Any], config: dict[str, Any], regress_forces: bool, path: Path
) -> Normalizers:
    """The normalizers of an OCP checkpoint, by the original's rule.

    The settings are ``config["normalizer"]``, else ``config["dataset"]``:

    * ``normalize_labels`` true: the energy normalizer (``target``) from the settings'
      ``target_mean``/``target_std`` and, for a model that regresses forces, the force
      normalizer (``grad_target``) from ``grad_target_mean``/``grad_target_std``, each
      overwritten by the checkpoint's saved ``normalizers`` entry of that key; either missing
      from both is an error naming it.
    * ``normalize_labels`` false: no normalization, as in OCP, even where entries are saved
      (a warning says that they are not applied).
    * no ``normalize_labels``: the saved entries, where there are any (both are then needed).

    Saved entries may be keyed fairchem's way (``energy``/``forces``, the deviation ``rmsd``);
    fairchem's element references (``checkpoint["elementrefs"]["energy"]
    ["element_references"]``, indexed by atomic number) are added per atom whatever the
    settings.  The force normalizer's mean must be 0.
    """
    saved = _saved_normalizers(data, path)
    source = "normalizer" if "normalizer" in config else "dataset"
    settings = config.get(source)
    settings = settings if isinstance(settings, dict) else {}
    flag = settings.get("normalize_labels")
    if flag is None:
        values = saved
    elif not flag:
        if saved:
            warn(
                f"checkpoint {path}: config['{source}']['normalize_labels'] is false, so its "
                f"saved normalizers ({', '.join(sorted(saved))}) are not applied, as in OCP: "
                "the model's raw outputs are taken as eV and eV/Å"
            )
        values = {}
    else:
        roles = ("target", "grad_target") if regress_forces else ("target",)
        values = {role: _config_normalizer(settings, role, source, path) for role in roles}
        values = {role: value for role, value in values.items() if value is not None}
        values.update({role: value for role, value in saved.items() if role in roles})
    if values or flag:
        needed = ("target", "grad_target") if regress_forces else ("target",)
        missing = [role for role in needed if role not in values]
        if missing:
            aliases = {role: key for key, role in _NORMALIZER_ROLES.items() if key != role}
            raise CheckpointError(
                f"checkpoint {path}: its labels are normalized, but the {missing[0]!r} "
                f"normalizer is missing: no saved normalizers[{missing[0]!r}] (or "
                f"[{aliases[missing[0]]!r}]), nor {missing[0]}_mean/{missing[0]}_std in "
                f"config[{source!r}] with normalize_labels true"
            )
    energy = values.get("target", {"mean": 0.0, "std": 1.0})
    forces = values.get("grad_target", {"mean": 0.0, "std": 1.0})
    if forces["mean"] != 0:
        raise CheckpointError(
            f"checkpoint {path}: a nonzero force normalizer mean ({forces['mean']}); forces are "
            "scaled only"
        )
    try:
        return Normalizers(
            energy_mean=energy["mean"],
            energy_std=energy["std"],
            forces_std=forces["std"],
            element_references=_element_references(data, path),
        )
    except ValueError as error:
        raise CheckpointError(f"checkpoint {path}: {error}") from None


def _saved_normalizers(data: dict[str, Any], path: Path) -> dict[str, dict[str, float]]:
    """``{"target"/"grad_target": {"mean", "std"}}`` of the checkpoint's ``normalizers``
    (OCP's keys or fairchem's); keys of neither kind beside them are ignored, as OCP does."""
    saved = data.get("normalizers") or {}
    if not isinstance(saved, dict):
        raise CheckpointError(
            f"checkpoint {path}: its normalizers are a {type(saved).__name__}, expected a dict"
        )
    known = [key for key in saved if key in _NORMALIZER_ROLES]
    if saved and not known:
        raise CheckpointError(
            f"checkpoint {path}: its normalizers have the keys {sorted(map(str, saved))}, none "
            "of OCP's 'target'/'grad_target' or fairchem's 'energy'/'forces'"
        )
    out: dict[str, dict[str, float]] = {}
    for key in known:
        role = _NORMALIZER_ROLES[key]
        if role in out:
            both = sorted(k for k in known if _NORMALIZER_ROLES[k] == role)
            raise CheckpointError(
                f"checkpoint {path}: its normalizers have both {both[0]!r} and {both[1]!r}, "
                "the same normalizer under OCP's and fairchem's names"
            )
        entry = saved[key]
        try:
            spread = entry["rmsd"] if "rmsd" in entry else entry["std"]
            out[role] = {"mean": _float(entry["mean"]), "std": _float(spread)}
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as error:
            raise CheckpointError(
                f"checkpoint {path}: its normalizer {key!r} is not a dict of numbers "
                f"{{'mean', 'std' (or 'rmsd')}} ({type(error).__name__}: {error})"
            ) from None
    return out


def _config_normalizer(
    settings: dict[str, Any], role: str, source: str, path: Path
) -> dict[str, float] | None:
    """``{"mean", "std"}`` of normalizer ``role`` from the config's ``{role}_mean`` and
    ``{role}_std`` (None without the mean, as in OCP)."""
    if f"{role}_mean" not in settings:
        return None
    try:
        return {
            "mean": _float(settings[f"{role}_mean"]),
            "std": _float(settings[f"{role}_std"]),
        }
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(
            f"checkpoint {path}: config['{source}'] has no numbers {role}_mean and {role}_std "
            f"({type(error).__name__}: {error})"
        ) from None


def _element_references(data: dict[str, Any], path: Path) -> tuple[tuple[int, float], ...]:
    """fairchem's energy element references as ``(Z, eV)`` pairs for Z in 1..118 (every
    atomic number its table covers, zeros included: fairchem adds those too); none without
    ``elementrefs``."""
    refs = data.get("elementrefs")
    if not refs:
        return ()
    table = refs.get("energy") if isinstance(refs, dict) else None
    table = table.get("element_references") if isinstance(table, dict) else None
    if not isinstance(table, Tensor) or table.ndim != 1 or not table.is_floating_point():
        raise CheckpointError(
            f"checkpoint {path}: its 'elementrefs' are not fairchem's energy references "
            "({'energy': {'element_references': a 1-d float tensor indexed by atomic number}})"
        )
    values = table.double().tolist()
    return tuple((z, values[z]) for z in range(1, min(len(values), MAX_ATOMIC_NUMBER + 1)))


def _dict_entry(data: dict[str, Any], key: str, path: Path, label: str) -> dict[str, Any]:
    """A copy of dict ``data[key]`` (``{}`` when absent or None); ``label`` names it in errors."""
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise CheckpointError(
            f"checkpoint {path}: {label} is a {type(value).__name__}, expected a dict"
        )
    return dict(value)


def _own_info(data: dict[str, Any], path: Path) -> CheckpointInfo:
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has forcecalc format version {version}; this forcecalc reads "
            f"version {FORMAT_VERSION}"
        )
    missing = [key for key in ("model", "model_kwargs", "normalizers") if key not in data]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} (forcecalc format) lacks the entry or entries "
            f"{', '.join(repr(key) for key in missing)}"
        )
    saved = _dict_entry(data, "normalizers", path, "'normalizers'")
    expected = set(Normalizers().as_dict())
    if set(saved) - {"element_references"} != expected:
        raise CheckpointError(
            f"checkpoint {path}: 'normalizers' has the keys {sorted(saved)}, expected "
            f"{sorted(expected)} (and optionally 'element_references')"
        )
    try:
        normalizers = Normalizers.from_dict(saved)
    except (TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(
            f"checkpoint {path}: 'normalizers' are not valid numbers ({error})"
        ) from None
    return CheckpointInfo(
        model=str(data["model"]),
        model_kwargs=_dict_entry(data, "model_kwargs", path, "'model_kwargs'"),
        normalizers=normalizers,
        source_format=FORMAT,
        elements=_elements(data.get("elements"), path),
        metadata=dict(data.get("metadata") or {}),
    )


def _elements(value: Any, path: Path) -> list[int] | None:
    """A forcecalc checkpoint's ``elements``: None, or a list of atomic numbers (integers in
    1..118), else a :class:`CheckpointError` naming the entries that are not."""
    if value is None:
        return None
    if not isinstance(value, list | tuple):
        raise CheckpointError(
            f"checkpoint {path}: 'elements' is a {type(value).__name__}, expected a list of "
            "atomic numbers"
        )
    bad = [z for z in value if type(z) is not int or not 1 <= z <= MAX_ATOMIC_NUMBER]
    if bad:
        raise CheckpointError(
            f"checkpoint {path}: 'elements' must be atomic numbers (integers 1 to "
            f"{MAX_ATOMIC_NUMBER}), but holds {', '.join(map(repr, bad[:10]))}"
            f"{f' and {len(bad) - 10} more' if len(bad) > 10 else ''}"
        )
    return list(value)


def read_checkpoint(
    source: str | os.PathLike, allow_unsafe: bool = False
) -> tuple[CheckpointInfo, dict[str, Tensor]]:
    """Read a checkpoint file (either format) without building the model.

    Args:
        source: a path, a shipped name (``"spinconv-fc"``) or an OCP name (downloaded once).
        allow_unsafe: allow full unpickling (only for files from a source you trust).

    Returns:
        ``(info, state_dict)`` with ``module.`` prefixes removed.
    """
    from forcecalc.hub import resolve_checkpoint

    path = resolve_checkpoint(source)
    data = _read(path, allow_unsafe)
    info = _own_info(data, path) if data.get("format") == FORMAT else _ocp_info(data, path)
    info.path = str(path)
    if info.model not in model_names():
        raise CheckpointError(
            f"checkpoint {path} is for model {info.model!r}, which forcecalc does not know "
            f"(known: {', '.join(model_names())})"
        )
    state_dict = _strip_module_prefix(data["state_dict"])
    if info.source_format == "ocp" and data.get("ema") is not None:
        state_dict = _ema_weights(state_dict, data["ema"], info, path)
        info.metadata["weights"] = "ema"
    return info, state_dict


def _ema_weights(
    state_dict: dict[str, Tensor], ema: Any, info: CheckpointInfo, path: Path
) -> dict[str, Tensor]:
    """``state_dict`` with its parameters replaced by an OCP checkpoint's exponential moving
    average, which OCP's trainer predicts with: ``shadow_params`` lists the trainable
    parameters (``requires_grad``: not ForceNet's frozen tables) in the model's order, which is
    the order of the parameters among the checkpoint's weights (buffers and frozen parameters
    told apart by building the model)."""
    shadow = ema.get("shadow_params") if isinstance(ema, dict) else None
    if not isinstance(shadow, list | tuple):
        raise CheckpointError(
            f"checkpoint {path}: its 'ema' entry is not OCP's moving average "
            "(a dict with a 'shadow_params' list)"
        )
    model = build_model(info.model, info.model_kwargs)
    parameters = {name for name, value in model.named_parameters() if value.requires_grad}
    names = [name for name in state_dict if name in parameters]
    shapes_match = len(names) == len(shadow) and all(
        isinstance(value, Tensor) and value.shape == state_dict[name].shape
        for name, value in zip(names, shadow, strict=False)
    )
    if not shapes_match:
        raise CheckpointError(
            f"checkpoint {path}: its moving-average weights ({len(shadow)} tensors) do not "
            f"match its {len(names)} parameters in order and shape"
        )
    return {**state_dict, **dict(zip(names, shadow, strict=True))}


def load_checkpoint(
    source: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "float32",
    allow_unsafe: bool = False,
    **model_options: Any,
) -> Potential:
    """Load a checkpoint (OCP's format or ours) as a ready :class:`Potential` in eval mode.

    Args:
        source: a path, a shipped name (``"spinconv-fc"``, ``"spinconv-fc.pt"``) or an OCP
            name (``"SpinConv-S2EF-OC20-All"``, downloaded once into the cache).
        device: ``"cpu"``, ``"cuda"``, ...; default CUDA when available, else CPU.
        dtype: ``"float32"`` or ``"float64"`` (or a torch dtype).
        allow_unsafe: allow full unpickling (only for files from a source you trust).
        **model_options: forcecalc's own model options that override the checkpoint's
            (e.g. SpinConv's ``rotations`` or ``forces``).

    Raises:
        CheckpointError: unreadable file, unknown model, model_kwargs it cannot be built
            with, missing, unexpected, wrongly shaped or integer (for floating) weights.
        ValueError: a device that is unknown or not available, an unknown dtype, or
            ``model_options`` the checkpoint's model does not take.
    """
    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    info, state_dict = read_checkpoint(source, allow_unsafe=allow_unsafe)
    return build_potential(info, state_dict, torch_device, torch_dtype, **model_options)


def build_potential(
    info: CheckpointInfo,
    state_dict: dict[str, Tensor],
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "float32",
    **model_options: Any,
) -> Potential:
    """The :class:`Potential` (eval mode) of a checkpoint already read
    (:func:`read_checkpoint`'s ``info`` and ``state_dict``); the rest as
    :func:`load_checkpoint`, which is :func:`read_checkpoint` then this."""
    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    kwargs = {**info.model_kwargs, **model_options}
    try:
        model = build_model(info.model, kwargs)
    except (ValueError, TypeError) as error:
        if model_options and _builds(info):  # the options' fault, not the checkpoint's
            raise ValueError(
                f"{_options_problem(info.model, model_options)} (checkpoint {info.path}): {error}"
            ) from None
        raise CheckpointError(
            f"checkpoint {info.path}: the {info.model} model cannot be built from its "
            f"model_kwargs: {error}"
        ) from None
    if not getattr(model, "regress_forces", True):
        raise CheckpointError(
            f"checkpoint {info.path}: its {info.model} model predicts energies only "
            "(regress_forces=False); forcecalc's calculators, relaxations and MD need forces"
        )
    # in the wanted dtype before loading: float64 weights stay float64 (loading into float32
    # parameters would round them)
    model = model.to(dtype=torch_dtype)
    _check_shapes(model, state_dict, info)
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing weights {result.missing_keys[:8]}")
        if result.unexpected_keys:
            parts.append(f"unexpected weights {result.unexpected_keys[:8]}")
        raise CheckpointError(
            f"checkpoint {info.path} does not fit the {info.model} model built from its own "
            f"config: {'; '.join(parts)}"
        )
    info.model_kwargs = kwargs
    potential = Potential(model, info).eval()
    return potential.to(device=torch_device, dtype=torch_dtype)


def check_option_names(options: dict[str, Any]) -> None:
    """A ``TypeError`` naming the keyword arguments that are no loading option at all
    (``allow_unsafe`` nor any model's option): a caller's misspelt argument (``fmx=0.1`` to
    :func:`forcecalc.relax`), not a model's."""
    known = {"allow_unsafe"}
    for name in model_names():
        known |= set(inspect.signature(model_class(name).__init__).parameters) - {"self"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(
            f"unexpected keyword argument(s) {', '.join(unknown)}: neither an argument of the "
            "function called nor a loading option (allow_unsafe, or a model's)"
        )


def refuse_loading_options(options: dict[str, Any]) -> None:
    """With an already loaded model: a ``ValueError`` naming the loading options given
    (``allow_unsafe`` and the model's), which would otherwise be ignored;
    ``allow_unsafe=False``, the default, is none."""
    given = sorted(
        name for name, value in options.items() if (name, value) != ("allow_unsafe", False)
    )
    if given:
        raise ValueError(
            f"model option(s) {', '.join(given)} given with a loaded model: they apply when a "
            "checkpoint is loaded (pass them to load_checkpoint, or give the checkpoint's "
            "name or path instead)"
        )


def as_potential(
    model: str | os.PathLike | Potential,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    **model_options: Any,
) -> Potential:
    """``model`` if it is a loaded :class:`Potential` (a ``device`` or ``dtype`` other than
    its own, or loading options, are a ``ValueError``: :func:`refuse_loading_options`), else
    the checkpoint it names loaded by :func:`load_checkpoint` with ``model_options``
    (``allow_unsafe`` and the model's; float32 unless ``dtype`` says otherwise); anything
    else is a ``TypeError`` saying what is accepted."""
    if not isinstance(model, (str, os.PathLike, Potential)):
        raise TypeError(
            "the model must be a checkpoint (a file path or a known name) or a loaded "
            f"forcecalc Potential (load_checkpoint), got {type(model).__name__}"
        )
    check_option_names(model_options)
    if isinstance(model, Potential):
        refuse_loading_options(model_options)
        model.check_same(device, dtype)
        return model
    return load_checkpoint(
        model, device=device, dtype="float32" if dtype is None else dtype, **model_options
    )


def _options_problem(model: str, options: dict[str, Any]) -> str:
    """What is wrong with ``options`` for ``model``: options it does not have, or values it
    does not take."""
    accepted = inspect.signature(model_class(model).__init__).parameters
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        return f"option(s) {', '.join(unknown)} do not apply to this {model} model"
    return (
        f"option(s) {', '.join(sorted(options))}, as given, cannot be used with this {model} model"
    )


def _builds(info: CheckpointInfo) -> bool:
    """Whether the checkpoint's model builds from its own ``model_kwargs`` alone."""
    try:
        build_model(info.model, info.model_kwargs)
    except (ValueError, TypeError):
        return False
    return True


def _check_shapes(model: nn.Module, state_dict: dict[str, Tensor], info: CheckpointInfo) -> None:
    """A :class:`CheckpointError` naming the weights whose shape is not the model's, or whose
    kind of number is not (integers for floating-point weights, or the reverse: loading would
    cast them silently)."""
    expected = model.state_dict()
    pairs = [
        (key, value, expected[key])
        for key, value in state_dict.items()
        if key in expected and isinstance(value, Tensor) and isinstance(expected[key], Tensor)
    ]
    for problem, wrong in (
        (
            "the wrong shape",
            [
                f"{key}: model {tuple(want.shape)}, checkpoint {tuple(value.shape)}"
                for key, value, want in pairs
                if value.shape != want.shape
            ],
        ),
        (
            "the wrong kind of number",
            [
                f"{key}: model {str(want.dtype).removeprefix('torch.')}, checkpoint "
                f"{str(value.dtype).removeprefix('torch.')}"
                for key, value, want in pairs
                if value.is_floating_point() != want.is_floating_point()
                or value.is_complex() != want.is_complex()
            ],
        ),
    ):
        if wrong:
            more = f" (and {len(wrong) - 8} more)" if len(wrong) > 8 else ""
            raise CheckpointError(
                f"checkpoint {info.path} does not fit the {info.model} model built from its "
                f"config: weights of {problem}: {'; '.join(wrong[:8])}{more}"
            )


def save_checkpoint(
    potential: Potential,
    path: str | os.PathLike,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``potential`` in forcecalc's format, atomically (temp file + rename).

    The weights keep the potential's dtype (a float64 model is saved in float64, so that
    loading it with ``dtype="float64"`` gives back its exact numbers).  Everything else is
    written as what the safe loader (``weights_only``) reads: model options given as tensors
    or numpy arrays (SpinConv's ``rotations``) as nested lists of their exact values (which
    the model takes back), metadata as plain numbers, strings, lists and dicts (numpy values
    as numbers and lists, paths as strings, dates and times in ISO format; tensors kept).

    Args:
        potential: the model and its normalizers.
        path: destination.
        metadata: merged over ``potential.info.metadata`` (training data, metrics, license...).

    Returns:
        The path written.

    Raises:
        ValueError: a model option or metadata value of another kind (named), before anything
            is written.
    """
    info = potential.info
    state_dict = {k: v.detach().to("cpu") for k, v in potential.model.state_dict().items()}
    data = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": info.model,
        "model_kwargs": _plain(info.model_kwargs, "model_kwargs", tensors=False),
        "state_dict": state_dict,
        "normalizers": _plain(info.normalizers.as_dict(), "normalizers", tensors=False),
        "elements": _plain(info.elements, "elements", tensors=False),
        "cutoff": potential.cutoff,
        "metadata": _plain({**info.metadata, **(metadata or {})}, "metadata", tensors=True),
    }
    return torch_save(data, path)


#: Values the safe loader reads as they are.
_PLAIN_TYPES = (type(None), bool, int, float, complex, str, bytes, bytearray)


def _plain(value: Any, where: str, tensors: bool) -> Any:
    """A copy of ``value`` made of what ``torch.load(weights_only=True)`` reads: built-in
    numbers, strings, lists, tuples, sets and dicts (numpy scalars and arrays as numbers and
    lists, paths as strings, dates and times as ISO strings), and tensors (on the CPU) where
    ``tensors``, else as nested lists; another object is a ``ValueError`` naming ``where``."""
    if type(value) in _PLAIN_TYPES or isinstance(value, torch.dtype | torch.device):
        return value
    if isinstance(value, Tensor):
        return value.detach().to("cpu") if tensors else value.tolist()
    if isinstance(value, np.ndarray | np.generic):
        return _plain(value.tolist(), where, tensors)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    for kind in (bool, int, float, str):  # subclasses (IntEnum, ...): the plain value
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, dict):
        return {
            _plain(key, f"{where} key {key!r}", tensors): _plain(item, f"{where}[{key!r}]", tensors)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):  # a namedtuple too: a plain tuple
        items = [_plain(item, f"{where}[{i}]", tensors) for i, item in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, set | frozenset):
        return {_plain(item, f"{where} item", tensors) for item in value}
    raise ValueError(
        f"cannot save {where}: a {type(value).__module__}.{type(value).__qualname__}, which "
        "the safe loader does not read (use numbers, strings, lists, dicts or tensors)"
    )


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` → CUDA when available, else CPU; otherwise the device named, which must exist.

    Raises:
        ValueError: an unknown device string, an accelerator that is not available (CUDA on
            a torch built without it or with no GPU visible), or an index past the device count.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"unknown device {device!r} (expected 'cpu', 'cuda' or 'cuda:N'): "
            f"{str(error).splitlines()[0][:200]}"
        ) from None
    if resolved.type == "cpu":
        return resolved
    backend = getattr(torch, resolved.type, None)
    if not callable(getattr(backend, "is_available", None)):
        raise ValueError(
            f"device {str(device)!r} is not one forcecalc can compute on "
            "(expected 'cpu', 'cuda' or 'cuda:N')"
        )
    if not backend.is_available():
        if resolved.type == "cuda":
            why = (
                f"torch {torch.__version__} built without CUDA"
                if torch.version.cuda is None and torch.version.hip is None
                else "no GPU visible"
            )
        else:
            why = f"torch {torch.__version__} sees no {resolved.type} device"
        raise ValueError(
            f"device {str(device)!r} requested but {resolved.type.upper()} is not available ({why})"
        )
    count = backend.device_count()
    if resolved.index is not None and resolved.index >= count:
        raise ValueError(
            f"device {str(device)!r} requested but only {count} {resolved.type} device(s) "
            f"are visible ({resolved.type}:0 to {resolved.type}:{count - 1})"
        )
    return resolved


def resolve_dtype(dtype: str | torch.dtype | np.dtype | type) -> torch.dtype:
    """``"float32"``/``"float64"``, a torch dtype or a numpy one (``np.float64``) → the torch
    dtype."""
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    else:
        name = dtype
        if not isinstance(dtype, str) and dtype is not None:
            try:
                name = np.dtype(dtype).name
            except TypeError:
                name = None
        resolved = {"float32": torch.float32, "float64": torch.float64}.get(name)
    if resolved not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return resolved
