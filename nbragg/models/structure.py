"""Structure factors as the kernels see them: a dense grid, its index limits, switches."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class StructureModel:
    grid: np.ndarray        # (nh, nk, nl); 1x1x1 zeros when there is no grid
    hkl_min: tuple
    hkl_max: tuple
    hkls: int               # nanoBragg's "initialized hkls" count
    default_F: float
    interpolate: bool
    interpolation_mode: str  # auto-on / auto-off / explicit / explicit-off


def resolve_structure(structure, Na, Nb, Nc):
    """Apply the interpolation rule: automatic when any N <= 2 (before clamping to 1)."""
    if structure.Fhkl is not None:
        grid = np.ascontiguousarray(structure.Fhkl, dtype=np.float64)
        lo = tuple(int(v) for v in structure.hkl_origin)
        hi = tuple(lo[i] + grid.shape[i] - 1 for i in range(3))
        hkls = int(structure.hkl_count)
    else:
        grid = np.zeros((1, 1, 1))
        lo = (0, 0, 0)
        hi = (0, 0, 0)
        hkls = 0
    if structure.interpolate is None:
        interp = Na <= 2 or Nb <= 2 or Nc <= 2
        mode = "auto-on" if interp else "auto-off"
    else:
        interp = bool(structure.interpolate)
        mode = "explicit" if interp else "explicit-off"
    if hkls == 0:
        interp = False
        if mode == "auto-on":
            mode = "auto-off"
    return StructureModel(grid=grid, hkl_min=lo, hkl_max=hi, hkls=hkls,
                          default_F=float(structure.default_F), interpolate=interp,
                          interpolation_mode=mode)
