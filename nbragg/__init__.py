"""nbragg: nanoBragg's diffraction model in Numba, differentiable.

A re-implementation of James Holton and Ken Frankel's nanoBragg (far-field diffraction
from a perfect-lattice nanocrystal onto a pixel detector).

``import nbragg`` loads nothing heavy: the records (Experiment, Beam, Detector...) and
NumPy load on first use of their names, the engine, gradients and refinement -- and Numba
with them -- on first use of theirs.
"""

import importlib
import importlib.util

from .errors import ArgumentError, BackendError, InputFileError, NbraggError, ParameterError

__version__ = "0.1.0"

# name -> the module that defines it, imported when the name is first used
_LAZY = {
    **{name: "experiment" for name in ("Experiment", "Beam", "Crystal", "Detector", "Material", "Panel",
                                       "PanelGroup", "Response", "Sampling", "Structure")},
    "simulate": "engine", "build_model": "engine", "Result": "engine", "Stats": "engine",
    "gradient": "gradients", "jacobian": "gradients", "check_gradients": "gradients", "GradientCheck": "gradients",
    "get_params": "params", "set_params": "params",
    "refine": "refine", "Fit": "refine",
    "refine_many": "refine_many", "ManyFit": "refine_many",
    "sase_spectrum": "spectrum",
}

__all__ = [
    "Experiment", "Beam", "Detector", "Panel", "PanelGroup", "Crystal", "Structure", "Sampling", "Response", "Material",
    "simulate", "build_model", "Result", "Stats",
    "gradient", "jacobian", "check_gradients", "GradientCheck", "get_params", "set_params",
    "refine", "Fit", "refine_many", "ManyFit", "sase_spectrum",
    "NbraggError", "ArgumentError", "InputFileError", "ParameterError", "BackendError",
]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        if importlib.util.find_spec(f"{__name__}.{name}") is not None:   # a submodule: nbragg.engine
            try:
                return importlib.import_module(f".{name}", __name__)
            except ImportError as exc:    # an optional bridge without its library: hasattr() is False
                raise AttributeError(f"module 'nbragg' has no attribute {name!r} ({exc})") from exc
        raise AttributeError(f"module 'nbragg' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value          # later uses skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
