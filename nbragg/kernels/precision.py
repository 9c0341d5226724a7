"""Single-precision twins of the compiled kernels.

The physics is written once, in float64.  A single-precision twin of an @njit function is
the same bytecode compiled again with every float literal and every float module constant
turned into a numpy float32, ``real`` (the cast the kernels apply where an integer meets a
float: ``float`` in the originals) bound to ``numpy.float32``, ``REAL`` (the dtype of
working arrays) bound to ``numpy.float32``, and every compiled function it calls replaced
by that function's own twin.  With float32 inputs the whole computation then stays in
float32; :func:`float64_variables` lists whatever did not, which the tests require to be
nothing but the declared accumulators (``np.float64(...)``: the per-pixel sum of samples).

The float64 originals are untouched: ``float(i)`` of a loop index and float64(x) of a
float32-exact constant change no bits.
"""

import types

import numpy as np
from .. import _jitcache  # noqa: F401  (nbragg's cache keys, before any cached function)
from numba import njit
from numba.core.registry import CPUDispatcher

SINGLE = np.float32
_SUFFIX = "_single"


def _single_consts(consts):
    out = []
    for c in consts:
        if type(c) is float:
            out.append(SINGLE(c))
        elif isinstance(c, types.CodeType):
            out.append(c.replace(co_consts=_single_consts(c.co_consts)))
        else:
            out.append(c)
    return tuple(out)


def single_clone(fn, twin_of):
    """A Python function: ``fn``'s code in single precision, calling ``twin_of(f)`` for
    every compiled function f it refers to."""
    py = fn.py_func
    code = py.__code__.replace(co_consts=_single_consts(py.__code__.co_consts))
    names = dict(py.__globals__)
    for name in code.co_names:
        value = names.get(name)
        if isinstance(value, CPUDispatcher):
            names[name] = twin_of(value)
        elif type(value) is float:
            names[name] = SINGLE(value)
    names["real"] = SINGLE
    names["REAL"] = SINGLE
    clone = types.FunctionType(code, names, py.__name__, py.__defaults__, py.__closure__)
    clone.__qualname__ = py.__qualname__ + _SUFFIX
    return clone


_cpu_twins = {}


def cpu_single(fn, cache=True):
    """The CPU single-precision twin of an @njit dispatcher (cached on disk like it;
    ``cache=False`` gives a separate twin tree compiled in this process, whose types can
    be inspected)."""
    twin = _cpu_twins.get((fn, cache))
    if twin is None:
        options = {k: v for k, v in fn.targetoptions.items() if k != "nopython"}
        clone = single_clone(fn, lambda f: cpu_single(f, cache))
        twin = njit(cache=cache, **options)(clone)
        _cpu_twins[(fn, cache)] = twin
    return twin


def float64_variables(dispatcher):
    """{function: [variables typed float64]} over a dispatcher compiled in this process
    (not loaded from the disk cache) and its callees."""
    out = {}
    seen = set()

    def visit(d):
        if id(d) in seen:
            return
        seen.add(id(d))
        for cres in d.overloads.values():
            bad = sorted(str(v) for v, t in cres.type_annotation.typemap.items() if str(t) == "float64")
            if bad:
                out[d.py_func.__qualname__] = bad
        for name in d.py_func.__code__.co_names:
            value = d.py_func.__globals__.get(name)
            if isinstance(value, CPUDispatcher):
                visit(value)

    visit(dispatcher)
    return out
