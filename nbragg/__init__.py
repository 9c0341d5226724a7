"""nbragg: nanoBragg's diffraction model in Numba, differentiable.

A re-implementation of James Holton and Ken Frankel's nanoBragg (far-field diffraction
from a perfect-lattice nanocrystal onto a pixel detector).
"""

from . import _jitcache  # noqa: F401  (must precede every cached Numba function)
from .engine import Result, Stats, build_model, simulate
from .errors import ArgumentError, BackendError, InputFileError, NbraggError, ParameterError
from .experiment import (Beam, Crystal, Detector, Experiment, Material, Panel, PanelGroup, Response, Sampling,
                         Structure)
from .gradients import GradientCheck, check_gradients, gradient, jacobian
from .params import get_params, set_params
from .refine import Fit, refine

__version__ = "0.1.0"

__all__ = [
    "Experiment", "Beam", "Detector", "Panel", "PanelGroup", "Crystal", "Structure", "Sampling", "Response", "Material",
    "simulate", "build_model", "Result", "Stats",
    "gradient", "jacobian", "check_gradients", "GradientCheck", "get_params", "set_params",
    "refine", "Fit",
    "NbraggError", "ArgumentError", "InputFileError", "ParameterError", "BackendError",
]
