"""A lighter first Numba call for nbragg's own command processes.

The first time a process compiles or loads a Numba function, Numba checks that SciPy's
BLAS is there by importing ``scipy.linalg.cython_blas``, and importing that submodule
imports the whole ``scipy.linalg`` package first: about a fifth of a cheap command's run
(SciPy's array-API layer, NumPy's f2py and more), for kernels that call no BLAS.
:func:`load_blas_module` loads that one extension module by itself, under its own name,
before Numba looks.  Numba then finds the very module it would have imported, so its
BLAS support is what it would have been; ``scipy.linalg`` is imported later only by the
commands that use it (refinement), and cimports of the BLAS module from SciPy's own
extensions find the same module.

Only the command entry points call it (:mod:`nbragg.resident`): a library user's process
is left as Numba and SciPy make it.  Standard library only.
"""

import importlib.machinery
import importlib.util
import os
import sys

BLAS_MODULE = "scipy.linalg.cython_blas"


def load_blas_module():
    """Load ``scipy.linalg.cython_blas`` without the rest of ``scipy.linalg``, unless a
    module by that name is already there.  Returns whether it was loaded here.  Anything
    unexpected (no SciPy, another layout, an error in the module's initialisation) leaves
    the process as it was, for Numba to import it its own way."""
    if BLAS_MODULE in sys.modules or "scipy.linalg" in sys.modules:
        return False
    try:
        scipy_spec = importlib.util.find_spec("scipy")
    except (ImportError, ValueError):
        return False
    if scipy_spec is None or not scipy_spec.submodule_search_locations:
        return False
    for folder in scipy_spec.submodule_search_locations:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(folder, "linalg", "cython_blas" + suffix)
            if os.path.isfile(path):
                return _load_extension(path)
    return False


def _load_extension(path):
    try:
        spec = importlib.util.spec_from_file_location(BLAS_MODULE, path)
        module = importlib.util.module_from_spec(spec)     # (an extension is opened here)
        sys.modules[BLAS_MODULE] = module
        spec.loader.exec_module(module)
    except Exception:
        sys.modules.pop(BLAS_MODULE, None)
        return False
    return True
