"""pytest configuration: its presence puts ``tests/`` on ``sys.path`` (pytest's default import
mode), so test modules import ``ocp_fixtures`` and ``devices``; Triton's interpreter where
there is no CUDA device."""

import os

import torch

if not torch.cuda.is_available():
    # Triton compiles for CUDA devices only; without one, the fused kernels' tests run in its
    # interpreter, which is chosen when triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
