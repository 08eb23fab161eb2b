"""The training configuration: one dataclass, readable from YAML or JSON, every field a CLI flag.

The defaults are the papers' shared recipe: L1 losses on normalized targets, force coefficient
100 and energy coefficient 1 (SpinConv), fixed atoms weighted 0.05 and random rotations about
z (ForceNet, section 3.2 and Table 7), Adam with amsgrad, the learning rate multiplied by 0.8
when the validation force MAE plateaus (SpinConv).  See ``forcecalc/train/README.md``.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Hashable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

ENERGY_LOSSES = ("l1", "mse")
FORCE_LOSSES = ("l1", "mse", "l2mae")
ROTATIONS = ("none", "z", "3d", "auto")
OPTIMIZERS = ("adam", "adamw")
SCHEDULERS = ("plateau", "cosine", "constant")
NORMALIZER_MODES = ("auto", "fit", "keep")
ENERGY_REFERENCES = ("none", "fit")
NORM_STATISTICS = ("auto", "train", "keep")
MONITORED = ("forces_mae", "energy_mae", "efwt")


#: Allowed range of each numeric option: ``(low, high, low excluded, high excluded)``, a bound
#: of ``None`` meaning none; lists (``tag_weights``) are checked item by item.
RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "val_fraction": (0, 1, False, True),
    "val_max_frames": (1, None, False, False),
    "split_seed": (0, 2**32 - 1, False, False),
    "energy_coefficient": (0, None, False, False),
    "force_coefficient": (0, None, False, False),
    "fixed_atom_weight": (0, None, False, False),
    "tag_weights": (0, None, False, False),
    "weight_decay": (0, None, False, False),
    "lr": (0, None, True, False),
    "batch_size": (1, None, False, False),
    "eval_batch_size": (1, None, False, False),
    "max_epochs": (1, None, False, False),
    "max_steps": (1, None, False, False),
    "max_time": (0, None, True, False),
    "warmup_steps": (0, None, False, False),
    "warmup_factor": (0, 1, False, False),
    "plateau_factor": (0, 1, True, True),
    "plateau_patience": (0, None, False, False),
    "min_lr": (0, None, False, False),
    "clip_grad_norm": (0, None, True, False),
    "ema_decay": (0, 1, True, True),
    "normalizer_frames": (1, None, False, False),
    "seed": (0, 2**32 - 1, False, False),
    "num_workers": (0, None, False, False),
    "eval_every": (0, None, False, False),
    "checkpoint_every": (1, None, False, False),
}


#: Help text of every option (also the CLI flag's help).
HELP: dict[str, str] = {
    "data": "training data: HDF5, ASE db, extxyz, traj, OUTCAR, ...",
    "val_data": "validation data (else a random split of --data)",
    "val_fraction": "fraction of --data held out when no --val-data",
    "val_max_frames": "evaluate on at most this many validation frames (a seeded subset)",
    "split_seed": "seed of the random train/validation split",
    "model": "model name when training from scratch",
    "model_kwargs": "model keyword arguments (JSON)",
    "init_checkpoint": "start from this checkpoint (fine-tuning)",
    "allow_unsafe": "allow full unpickling of the starting checkpoint (a trusted file only)",
    "freeze_except": "train only parameters under these module names (e.g. force_output_block)",
    "dtype": "float32 or float64",
    "energy_loss": f"energy loss: {', '.join(ENERGY_LOSSES)}",
    "force_loss": f"force loss: {', '.join(FORCE_LOSSES)}",
    "energy_coefficient": "weight of the energy loss",
    "force_coefficient": "weight of the force loss",
    "fixed_atom_weight": "force-loss weight of FixAtoms atoms (0 drops them; ForceNet: 0.05)",
    "tag_weights": "force-loss weights per OC20 tag 0,1,2 (replaces --fixed-atom-weight)",
    "rotation": "rotation augmentation: none, z, 3d, auto (3d for molecules, else z)",
    "optimizer": "adam or adamw",
    "amsgrad": "use the amsgrad variant (the papers)",
    "weight_decay": "weight decay (adamw: decoupled)",
    "lr": "peak learning rate",
    "batch_size": "structures per step and process",
    "eval_batch_size": "structures per evaluation batch",
    "max_epochs": "epochs (passes over the training data)",
    "max_steps": "stop after this many steps (overrides epochs)",
    "max_time": "stop once the run has trained this many seconds in all (resumes included); "
    "the schedule still spans max_steps or max_epochs",
    "warmup_steps": "linear warmup steps",
    "warmup_factor": "learning rate at step 0, as a fraction of --lr",
    "scheduler": f"after warmup: {', '.join(SCHEDULERS)}",
    "plateau_factor": "plateau: multiply the learning rate by this",
    "plateau_patience": "plateau: evaluations without improvement",
    "min_lr": "lowest learning rate (plateau and cosine)",
    "clip_grad_norm": "clip the gradient norm (none: off)",
    "ema_decay": "exponential moving average of weights (e.g. 0.999)",
    "amp": "bf16 autocast (CUDA only)",
    "normalizers": "auto (fit from data unless fine-tuning), fit, or keep the checkpoint's",
    "normalizer_frames": "frames used to fit the normalizers",
    "energy_references": "none (OC20: the energy mean per structure), or fit a reference energy "
    "per element with the normalizers (total energies of structures of different sizes)",
    "monitor": f"validation metric for plateau and best: {', '.join(MONITORED)} "
    "(no validation data: the training loss)",
    "out": "output folder",
    "device": "cpu or cuda (default: cuda if available)",
    "seed": "seed of initialisation, shuffling and augmentation",
    "num_workers": "data-loader worker processes",
    "eval_every": "evaluate every N steps (0: every epoch)",
    "checkpoint_every": "save the resumable state every N steps",
    "sync_batchnorm": "multi-process: batch statistics over all processes",
    "norm_statistics": "batch norms' running statistics: train (update them from the training "
    "batches), keep (as loaded: the layers stay in eval mode, their weights still train), or "
    "auto (keep when fine-tuning, train from scratch)",
    "progress": "show a progress bar",
}


@dataclass
class TrainConfig:
    """Everything a training or fine-tuning run needs (see the README for an example)."""

    # data
    data: list[str] = field(default_factory=list)
    val_data: list[str] = field(default_factory=list)
    val_fraction: float = 0.1
    val_max_frames: int | None = None
    split_seed: int = 0
    # model
    model: str = "forcenet"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    init_checkpoint: str | None = None
    allow_unsafe: bool = False
    freeze_except: list[str] = field(default_factory=list)
    dtype: str = "float32"
    # loss
    energy_loss: str = "l1"
    force_loss: str = "l1"
    energy_coefficient: float = 1.0
    force_coefficient: float = 100.0
    fixed_atom_weight: float = 0.05
    tag_weights: list[float] | None = None
    rotation: str = "auto"
    # optimisation
    optimizer: str = "adam"
    amsgrad: bool = True
    weight_decay: float = 0.0
    lr: float = 5e-4
    batch_size: int = 8
    eval_batch_size: int | None = None
    max_epochs: int = 50
    max_steps: int | None = None
    max_time: float | None = None
    warmup_steps: int = 0
    warmup_factor: float = 0.2
    scheduler: str = "plateau"
    plateau_factor: float = 0.8
    plateau_patience: int = 3
    min_lr: float = 1e-6
    clip_grad_norm: float | None = 10.0
    ema_decay: float | None = None
    amp: bool = False
    normalizers: str = "auto"
    normalizer_frames: int = 10000
    energy_references: str = "none"
    monitor: str = "forces_mae"
    # run
    out: str = "run"
    device: str | None = None
    seed: int = 0
    num_workers: int = 0
    eval_every: int = 0
    checkpoint_every: int = 500
    sync_batchnorm: bool = True
    norm_statistics: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        for option in fields(self):
            setattr(
                self,
                option.name,
                _checked(option.name, str(option.type), getattr(self, option.name)),
            )
        choices = {
            "energy_loss": ENERGY_LOSSES,
            "force_loss": FORCE_LOSSES,
            "rotation": ROTATIONS,
            "optimizer": OPTIMIZERS,
            "scheduler": SCHEDULERS,
            "normalizers": NORMALIZER_MODES,
            "energy_references": ENERGY_REFERENCES,
            "norm_statistics": NORM_STATISTICS,
            "monitor": MONITORED,
            "dtype": ("float32", "float64"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )
        for name, (low, high, low_open, high_open) in RANGES.items():
            value = getattr(self, name)
            if value is None:
                continue
            for item in value if isinstance(value, list) else [value]:
                if not _within(item, low, high, low_open, high_open):
                    raise ValueError(
                        f"{name} must be {_describe(low, high, low_open, high_open)}, got {value!r}"
                    )
        if self.tag_weights is not None and len(self.tag_weights) != 3:
            raise ValueError(f"tag_weights needs 3 values (tags 0, 1, 2), got {self.tag_weights}")
        if self.energy_coefficient == 0 and self.force_coefficient == 0:
            raise ValueError(
                "energy_coefficient and force_coefficient are both 0: the loss would be 0"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a mapping; unknown keys raise ``ValueError`` listing the valid ones, and
        so does an option given twice (``max-epochs`` and ``max_epochs``)."""
        spellings: dict[str, list[str]] = {}
        for key in values:
            spellings.setdefault(key.replace("-", "_"), []).append(key)
        twice = [" and ".join(keys) for keys in spellings.values() if len(keys) > 1]
        if twice:
            raise ValueError(f"training option(s) given twice: {'; '.join(twice)}")
        values = {k.replace("-", "_"): v for k, v in values.items()}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown training option(s) {', '.join(unknown)}; "
                f"valid: {', '.join(sorted(known))}"
            )
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """Read a YAML (``.yaml``/``.yml``) or JSON file; options it lacks keep their default."""
        return cls.from_dict(read_options(path))

    def updated(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (validated again)."""
        return TrainConfig.from_dict({**asdict(self), **changes})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _checked(name: str, annotation: str, value: Any) -> Any:
    """``value`` of option ``name`` as its declared type ``annotation``: numbers written as
    text (YAML reads ``1e-3`` as a string) become numbers, integral floats integers, ``"none"``
    ``None`` where allowed, paths strings; anything else of the wrong type is a ``ValueError``
    naming the option and the value."""
    kinds = annotation.split(" | ")
    optional = "None" in kinds
    if optional and isinstance(value, str) and value.strip().lower() in ("none", "null"):
        value = None
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} must be {_KIND_TEXT[kinds[0]]}, got None")
    kind = kinds[0]
    if kind == "bool":
        if isinstance(value, bool):
            return value
    elif kind == "int":
        number = _as_number(value)
        if number is not None and float(number).is_integer():
            return int(number)
    elif kind == "float":
        number = _as_number(value)
        if number is not None:
            return float(number)
    elif kind == "str":
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
    elif kind == "list[str]":
        items = [value] if isinstance(value, (str, os.PathLike)) else value
        if isinstance(items, (list, tuple)) and all(
            isinstance(item, (str, os.PathLike)) for item in items
        ):
            return [os.fspath(item) for item in items]
    elif kind == "list[float]":
        if isinstance(value, (list, tuple)):
            items = [_as_number(item) for item in value]
            if all(item is not None for item in items):
                return [float(item) for item in items]
    elif kind.startswith("dict["):
        if isinstance(value, dict):
            return dict(value)
    else:
        raise TypeError(f"option {name} has a type the config cannot check: {annotation}")
    raise ValueError(f"{name} must be {_KIND_TEXT[kind]}, got {value!r}")


_KIND_TEXT = {
    "bool": "true or false",
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "list[str]": "a string or a list of strings",
    "list[float]": "a list of numbers",
    "dict[str, Any]": "a mapping",
}


def _as_number(value: Any) -> float | int | None:
    """``value`` as a number (``bool`` excluded; numeric text parsed), else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        for parse in (int, float):
            try:
                return parse(text)
            except ValueError:
                continue
    return None


def _within(
    value: float, low: float | None, high: float | None, low_open: bool, high_open: bool
) -> bool:
    if not math.isfinite(value):
        return False
    if low is not None and (value < low or (low_open and value == low)):
        return False
    return high is None or not (value > high or (high_open and value == high))


def _describe(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    """``RANGES``' bounds in words: ``> 0``, ``>= 1``, ``in [0, 1)``."""
    if high is None:
        return f"{'>' if low_open else '>='} {low}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def read_options(path: str | Path) -> dict[str, Any]:
    """The options a YAML (``.yaml``/``.yml``) or JSON file sets, and only those, checked and
    converted to their types (``ValueError`` naming the file, the option and the value)."""
    path = Path(path)
    if path.is_dir() or not path.exists():  # a pipe (<(...)) is neither, and is read
        raise ValueError(
            f"config file {path} {'is a folder' if path.is_dir() else 'does not exist'}"
        )
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            values = _load_yaml(text) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None
    else:
        try:
            values = json.loads(text, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON: {error}") from None
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values")
    try:
        config = TrainConfig.from_dict(values)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return {key.replace("-", "_"): getattr(config, key.replace("-", "_")) for key in values}


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's ``pairs`` as a dict; a key given twice is a ``ValueError`` (``json``
    keeps the last silently)."""
    values: dict[str, Any] = {}
    for key, value in pairs:
        if key in values:
            raise ValueError(f"{key!r} is given twice")
        values[key] = value
    return values


def _load_yaml(text: str) -> Any:
    """``yaml.safe_load(text)``, with a key given twice in a mapping an error (PyYAML keeps
    the last silently)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, Hashable):  # the base class refuses it
                    continue
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"{key!r} is given twice", key_node.start_mark
                    )
                seen.add(key)
            return super().construct_mapping(node, deep)

    return yaml.load(text, Loader=UniqueKeyLoader)


def option_fields() -> list[tuple[str, str, Any, str]]:
    """``(name, type annotation, default, help)`` of every option, in declaration order."""
    out = []
    for f in fields(TrainConfig):
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        out.append((f.name, str(f.type), default, HELP[f.name]))
    return out
