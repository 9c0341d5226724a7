"""A lighter first Numba call for nbragg's own command processes.

Before it loads a function from its cache, Numba refreshes its CPU target: it imports and
installs every registry of lowering and typing implementations (the ufuncs, linear
algebra, typed containers, random numbers...) and the extensions of other installed
packages, which the process also tears down again at exit: a third of a cheap command's
run.  The cached machine code needs none of it, only Numba's runtime (NRT), which its
allocations call.  :func:`lighter_cache_loads` makes the loads of nbragg's own cached
functions (those under :mod:`nbragg._jitcache`'s locators) initialise that runtime alone.
Compiling is unaffected: Numba's compiler refreshes the target itself before it compiles
anything, so a cache miss finds every registry there.  Any other cached function is
loaded Numba's own way, registries first: some (a cached ``@vectorize``) build wrappers
with the target outside the compiler and need them.

Where that cannot be done (a Numba without the methods it relies on), the first load
refreshes the target, and one of the registries (``numba.np.arraymath``) checks that
SciPy's BLAS is there by importing ``scipy.linalg.cython_blas``; importing that submodule
imports the whole ``scipy.linalg`` package first (SciPy's array-API layer, NumPy's f2py
and more), for kernels that call no BLAS.  :func:`load_blas_module` loads that one
extension module by itself, under its own name, before Numba looks.  Numba then finds
the very module it would have imported, so its BLAS support is what it would have been;
``scipy.linalg`` is imported later only by the commands that use it (refinement), and
cimports of the BLAS module from SciPy's own extensions find the same module.

Only the command entry points call these (:mod:`nbragg.resident`): a library user's
process is left as Numba and SciPy make it.  Standard library only at import.
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


def lighter_cache_loads():
    """Make Numba's loads of nbragg's cached CPU functions initialise its runtime instead
    of refreshing the whole target (see the module's notes).  Returns whether it is in
    place (idempotent).  Where this Numba lacks the methods it relies on, nothing changes."""
    try:
        from numba.core import caching
        from numba.core.cpu import CPUContext
        from numba.core.runtime import rtsys
    except ImportError:
        return False
    cache = getattr(caching, "Cache", None)
    full_load = getattr(cache, "load_overload", None)
    if full_load is None or not all(hasattr(cache, name) for name in ("_load_overload",
                                                                     "_guard_against_spurious_io_errors")):
        return False
    if getattr(full_load, "_nbragg_light", False):
        return True

    def load_overload(self, sig, target_context):
        locator = getattr(getattr(self, "_impl", None), "locator", None)
        if not (getattr(locator, "_nbragg", False) and isinstance(target_context, CPUContext)):
            return full_load(self, sig, target_context)
        rtsys.initialize(target_context)            # (what a cached function's allocations call)
        with self._guard_against_spurious_io_errors():
            return self._load_overload(sig, target_context)

    load_overload._nbragg_light = True
    load_overload.__doc__ = full_load.__doc__
    cache.load_overload = load_overload
    return True
