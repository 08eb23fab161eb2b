"""forcecalc's warnings: one category, attributed to the caller's line.

A warning raised deep inside forcecalc (a checkpoint's normalizers not applied, a folder
passed where a known name wins) is about the user's call, so :func:`warn` points it at the
first frame outside the package, whichever public function led there (``warnings.warn``'s
fixed ``stacklevel`` cannot: the same check is reached from the calculators, ``relax`` and
``load_checkpoint`` at different depths).  Filter them all with
``warnings.filterwarnings("ignore", category=forcecalc.ForcecalcWarning)``.
"""

from __future__ import annotations

import os
import sys
import warnings

#: The package's folder, with a trailing separator: frames in files under it are forcecalc's.
PACKAGE = os.path.dirname(os.path.realpath(__file__)) + os.sep


class ForcecalcWarning(UserWarning):
    """A warning of forcecalc's own (the command line shows it as ``forcecalc: warning: ...``)."""


def warn(message: str) -> None:
    """Issue ``message`` as a :class:`ForcecalcWarning` at the first frame outside forcecalc
    (the user's line; the interpreter's top level if every frame is forcecalc's)."""
    frame = sys._getframe(1)
    level = 2  # warnings.warn's stacklevel of warn's caller
    while frame.f_back is not None and _in_package(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    warnings.warn(message, ForcecalcWarning, stacklevel=level)


def _in_package(filename: str) -> bool:
    """Whether ``filename`` (a code object's) is a file of forcecalc."""
    return os.path.realpath(filename).startswith(PACKAGE)
