"""Shared by the APOLLO front-end tests (tests/test_apollo.py,
tests/test_apollo_vs_apollo_torch.py): the length, projection refresh gap and rank of their short
runs, and the wide, tall and square weights they step (seeded: two calls, two identical copies)."""
from __future__ import annotations

import torch
from torch import nn

STEPS, GAP, RANK = 8, 3, 4        # refreshes at steps 0, 3 and 6
SHAPES = [(24, 40), (40, 24), (32, 32)]  # wide (left, per-column), tall and square (right, per-row)


def _params(dtype=torch.float32, shapes=SHAPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in shapes]
