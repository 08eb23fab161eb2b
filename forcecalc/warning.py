"""forcecalc's warnings: one category, attributed to the caller's line.

A warning raised deep inside forcecalc (a checkpoint's normalizers not applied, a folder
passed where a known name wins) is about the user's call, so :func:`warn` points it at the
first frame outside the package and the libraries that call into it (ASE's ``Atoms`` and
calculator base class, its optimizers, torch's modules), whichever public function led there
(``warnings.warn``'s fixed ``stacklevel`` cannot: the same check is reached from the
calculators, ``relax`` and ``load_checkpoint`` at different depths).  Filter them all with
``warnings.filterwarnings("ignore", category=forcecalc.ForcecalcWarning)``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings


def _folders(*packages: str) -> tuple[str, ...]:
    """The folders of the installed ``packages`` (found, not imported), each with a trailing
    separator."""
    specs = [importlib.util.find_spec(package) for package in packages]
    origins = [spec.origin for spec in specs if spec is not None and spec.origin]
    return tuple(os.path.dirname(os.path.realpath(origin)) + os.sep for origin in origins)


#: Folders whose frames are skipped: forcecalc's own, and those of the libraries a user's
#: line reaches forcecalc through (``atoms.get_forces()``, ``BFGS(atoms).run()``, ``model(x)``).
LIBRARIES = _folders("forcecalc", "ase", "torch")


class ForcecalcWarning(UserWarning):
    """A warning of forcecalc's own (the command line shows it as ``forcecalc: warning: ...``)."""


def warn(message: str) -> None:
    """Issue ``message`` as a :class:`ForcecalcWarning` at the first frame outside forcecalc,
    ASE and torch (the user's line; the interpreter's top level if there is none)."""
    frame = sys._getframe(1)
    level = 2  # warnings.warn's stacklevel of warn's caller
    while frame.f_back is not None and _in_library(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    warnings.warn(message, ForcecalcWarning, stacklevel=level)


def _in_library(filename: str) -> bool:
    """Whether ``filename`` (a code object's) is a file of forcecalc, ASE or torch."""
    return os.path.realpath(filename).startswith(LIBRARIES)
