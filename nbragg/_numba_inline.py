"""Shorter first compiles of nbragg's kernels: two of Numba's copies made cheaper.

1. Numba's inliner (``inline="always"``) deep-copies the callee's IR block by block, twice,
   and each block's copy takes a copy of its own of the function's scope, which holds every
   variable of the function: inlining a function of B blocks and V variables copies about
   2 B V variables.  nbragg's pixel walks inline large functions into one another (the
   tangent's row holds some 440 blocks and 7800 variables).  While Numba inlines a function
   of nbragg's, each scope is copied here once per copy of the function and the copied
   blocks share it, as the original blocks share theirs: the inliner renames the variables
   through that scope and then moves every copied block to the caller's scope, so the
   inlined code is the same.  (numba/numba#8989 is about a related copy of the same step.)
2. The copy propagation of Numba's parallel passes deep-copies its data-flow sets (a dict
   of sets of variable names, or of pairs of them) at every round of its fixed-point
   iteration, only to compare them with the next round's; the alias analysis copies its
   sets of names once, to read them.  While one of nbragg's functions compiles, such a
   dict is copied here as a dict of new sets of the same (immutable) names; anything else
   goes to ``copy.deepcopy``.

The machine code is the same (the tangent kernel's was compared instruction by
instruction; the tests compare small kernels').  Measured in one process on a 2-core
machine, cold cache, a 16x16 image with mosaic domains: 27 s before the first image, 137 s
more before the first gradient, 110 s more before the first Jacobian, 1.1 GB at most;
without these, 54 s, 236 s, 270 s and 1.9 GB.  Compiles of other code take these copies
only where they inline one of nbragg's functions.

:func:`install` only registers a listener on Numba's compile event; Numba's modules are
wrapped at the first compile of the process, so a process that loads cached kernels
imports nothing more.  Where Numba does not have the shape this expects, nothing changes.
"""

import copy
import threading
from itertools import chain

_PACKAGE = __name__.rpartition(".")[0]
_state = threading.local()   # (Numba compiles under one lock; thread-local all the same)
_installed = False
_listening = False


def _in_package(modname):
    modname = modname or ""
    return modname == _PACKAGE or modname.startswith(_PACKAGE + ".")


def _compiles():
    """The compiles in progress, outermost first: (whether the function is nbragg's, the
    scope copies of the inline it interrupted, restored when it ends)."""
    stack = getattr(_state, "compiles", None)
    if stack is None:
        stack = _state.compiles = []
    return stack


def _compiling_ours():
    stack = _compiles()
    return bool(stack) and stack[-1][0]


# ---- 1. the inliner's scope copies

def _scope_copies():
    return getattr(_state, "scopes", None)


def _shared_scope_copy(scope, memo):
    """A scope's deep copy, the same one for every block copied during one inline."""
    copies = _scope_copies()
    hit = copies.get(id(scope)) if copies is not None else None
    if hit is not None:
        memo[id(scope)] = hit[1]
        return hit[1]
    new = object.__new__(type(scope))    # what deepcopy does with a plain object, memo first
    memo[id(scope)] = new
    new.__dict__.update(copy.deepcopy(scope.__dict__, memo))
    if copies is not None:
        copies[id(scope)] = (scope, new)     # (the original kept alive while its id is a key)
    return new


def _wrap_inliner(ir, worker):
    original = worker.inline_ir

    def inline_ir(self, caller_ir, block, i, callee_ir, *args, **kwargs):
        if not _in_package(getattr(getattr(callee_ir, "func_id", None), "modname", "")):
            return original(self, caller_ir, block, i, callee_ir, *args, **kwargs)
        outer = _scope_copies()
        _state.scopes = {}
        if outer is None:
            ir.Scope.__deepcopy__ = _shared_scope_copy
        try:
            return original(self, caller_ir, block, i, callee_ir, *args, **kwargs)
        finally:
            _state.scopes = outer
            if outer is None:
                del ir.Scope.__deepcopy__

    inline_ir.__wrapped__ = original
    inline_ir._nbragg = True
    worker.inline_ir = inline_ir


# ---- 2. copy propagation's data-flow sets

def _sets_of_names(x):
    """Whether x is a dict of sets of names (str) or of tuples of names, keyed by int or str
    (the types gathered by C loops: these dicts hold tens of thousands of names)."""
    if type(x) is not dict:
        return False
    for k, v in x.items():
        if type(k) not in (int, str) or type(v) is not set:
            return False
        kinds = set(map(type, v))
        if kinds == {tuple}:
            kinds = set(map(type, chain.from_iterable(v)))
        if not kinds <= {str}:
            return False
    return True


def deepcopy(x, memo=None, _nil=[]):
    """copy.deepcopy, but a dict of sets of names, during a compile of nbragg's, as a dict of
    new sets of the same names (names are immutable: deepcopy gives them back as they are)."""
    if memo is None and _compiling_ours() and _sets_of_names(x):
        return {k: set(v) for k, v in x.items()}
    return copy.deepcopy(x, memo, _nil)


class _CopyModule:
    """What Numba's IR utilities see as the copy module."""

    deepcopy = staticmethod(deepcopy)

    def __getattr__(self, name):
        return getattr(copy, name)


# ---- installation

def wrap_numba():
    """Wrap Numba's inliner and give its IR utilities the copies above (idempotent).
    Returns whether the inliner is wrapped."""
    global _installed
    if _installed:
        return True
    try:
        from numba.core import inline_closurecall, ir, ir_utils
    except ImportError:    # pragma: no cover - another Numba layout
        return False
    worker = getattr(inline_closurecall, "InlineWorker", None)
    scope = getattr(ir, "Scope", None)
    if (worker is None or scope is None or not callable(getattr(worker, "inline_ir", None))
            or "__deepcopy__" in vars(scope) or "__slots__" in vars(scope)):
        return False
    if not getattr(worker.inline_ir, "_nbragg", False):
        _wrap_inliner(ir, worker)
    if getattr(ir_utils, "copy", None) is copy:
        ir_utils.copy = _CopyModule()
    _installed = True
    return True


def install():
    """Wrap Numba at the process's first compile, and follow which compiles are of
    nbragg's functions (idempotent)."""
    global _listening
    if _listening:
        return True
    try:
        from numba.core import event
    except ImportError:    # pragma: no cover - another Numba layout
        return False

    class Compiles(event.Listener):
        def on_start(self, ev):
            py_func = getattr((ev.data or {}).get("dispatcher"), "py_func", None)
            # (a compile started inside an inline, by type inference, copies its own scopes)
            _compiles().append((_in_package(getattr(py_func, "__module__", "")), _scope_copies()))
            _state.scopes = None
            if not _installed:
                try:
                    wrap_numba()
                except Exception:    # (never a reason for a compile to fail)
                    pass

        def on_end(self, ev):
            stack = _compiles()
            if stack:
                _state.scopes = stack.pop()[1]

    event.register("numba:compile", Compiles())
    _listening = True
    return True
