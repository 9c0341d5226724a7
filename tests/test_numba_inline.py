"""nbragg._numba_inline: Numba's inliner copies an nbragg function's scope once per copy
of the function, not once per block; copy propagation copies its sets of names as sets;
the code is what Numba makes without either."""

import re
import types

import numpy as np
import pytest
from numba import njit, prange
from numba.core import inline_closurecall, ir, ir_utils

from nbragg import _numba_inline
from nbragg.kernels import physics

ARGS = (0.3, 0.0, 0.0, 1.0, 0.2, -0.1, 0.97, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0)


def _compiled_caller():
    """A fresh (uncached) function inlining physics.polarization_parts, a function of
    nbragg's with many blocks, compiled here."""
    @njit(error_model="numpy")
    def caller(kahn, ix, iy, iz, dx, dy, dz, bx, by, bz, ex, ey, ez):
        return physics.polarization_parts(kahn, ix, iy, iz, dx, dy, dz, bx, by, bz, ex, ey, ez, True)
    caller(*ARGS)
    return caller


def _code(fn):
    """fn's machine code without its symbols' names (which carry a per-function id)."""
    (sig,) = fn.signatures
    text = fn.inspect_asm(sig)
    text = re.sub(r"_ZN[\w$.]+", "SYM", text)
    text = re.sub(r'SYM", \d+', 'SYM", N', text)      # (the length of a string holding a name)
    return re.sub(r"0x[0-9a-f]+", "ADDR", text)


def test_inliner_is_wrapped_at_the_first_compile():
    _compiled_caller()
    assert getattr(inline_closurecall.InlineWorker.inline_ir, "_nbragg", False)
    assert ir_utils.copy.deepcopy is _numba_inline.deepcopy
    assert "__deepcopy__" not in vars(ir.Scope)    # (only while an inline is in progress)


def test_scope_copied_once_per_copy_of_the_function(monkeypatch):
    made = []
    shared = []
    copy_scope = _numba_inline._shared_scope_copy

    def counting(scope, memo):
        copies = _numba_inline._scope_copies()
        (shared if copies is not None and id(scope) in copies else made).append(id(scope))
        return copy_scope(scope, memo)

    monkeypatch.setattr(_numba_inline, "_shared_scope_copy", counting)
    _compiled_caller()
    # the inliner copies the function (15 blocks) twice, one copy to change, one to give
    # back, each copying the function's scope and that scope's parent once; without the
    # wrapper every block's copy makes scopes of its own (60)
    assert len(made) == 4
    assert len(shared) >= 2 * 14


def test_other_code_is_inlined_as_numba_does(monkeypatch):
    seen = []
    monkeypatch.setattr(_numba_inline, "_shared_scope_copy", lambda scope, memo: seen.append(1))

    @njit(inline="always")
    def local(x):
        if x > 0.0:
            return 2.0 * x
        return -x

    @njit
    def caller(x):
        return local(x) + local(-x)

    assert caller(1.5) == 4.5
    assert seen == []


def test_inlined_code_is_numba_s_own(monkeypatch):
    wrapped = _compiled_caller()
    monkeypatch.setattr(inline_closurecall.InlineWorker, "inline_ir",
                        inline_closurecall.InlineWorker.inline_ir.__wrapped__)
    plain = _compiled_caller()
    assert wrapped(*ARGS) == plain(*ARGS)
    assert np.isfinite(wrapped(*ARGS)).all()
    code = _code(wrapped)
    assert len(code) > 1000
    assert code == _code(plain)


def test_left_alone_where_numba_has_another_shape(monkeypatch):
    monkeypatch.setattr(_numba_inline, "_installed", False)
    monkeypatch.setattr(ir.Scope, "__deepcopy__", lambda self, memo: self, raising=False)
    assert _numba_inline.wrap_numba() is False


def _parallel_sum():
    """A fresh parallel function: Numba's parallel passes run copy propagation on it."""
    @njit(parallel=True, error_model="numpy")
    def total(a, b):
        s = 0.0
        for i in prange(a.shape[0]):
            t = a[i] * b[i]
            u = t
            s += u + 1.0
        return s
    a = np.arange(64.0)
    assert total(a, a) == np.sum(a * a + 1.0)
    return total


def _recording_sets_of_names(monkeypatch):
    seen = []
    sets_of_names = _numba_inline._sets_of_names

    def recording(x):
        seen.append(sets_of_names(x))
        return seen[-1]

    monkeypatch.setattr(_numba_inline, "_sets_of_names", recording)
    return seen


def test_copy_propagation_copies_names_as_sets_in_nbragg_compiles(monkeypatch):
    fast = _recording_sets_of_names(monkeypatch)
    plain = _parallel_sum()
    assert fast == []                               # (not a compile of nbragg's)
    with monkeypatch.context() as m:
        m.setattr(_numba_inline, "_in_package", lambda modname: True)     # as if it were
        ours = _parallel_sum()
    assert any(fast)
    code = _code(ours)
    assert len(code) > 1000
    assert code == _code(plain)


def test_a_compile_of_nbragg_s_takes_the_set_copies(monkeypatch):
    fast = _recording_sets_of_names(monkeypatch)
    source = _parallel_sum.__code__.co_consts
    (code,) = [c for c in source if getattr(c, "co_name", "") == "total"]
    total = types.FunctionType(code, {"__name__": physics.__name__, "prange": prange})
    a = np.arange(16.0)
    assert njit(parallel=True, error_model="numpy")(total)(a, a) == np.sum(a * a + 1.0)
    assert any(fast)


def test_deepcopy_of_sets_of_names(monkeypatch):
    import copy
    assert _numba_inline.wrap_numba()
    deep = []
    monkeypatch.setattr(_numba_inline, "copy", types.SimpleNamespace(
        deepcopy=lambda *a: deep.append(1) or copy.deepcopy(*a), copy=copy.copy))
    flow = {1: {("a", "b"), ("c", "d")}, 2: set()}
    aliases = {"x": {"y", "z"}}
    other = {1: [("a", "b")]}
    _numba_inline._compiles().append((True, None))
    try:
        for x in (flow, aliases):
            y = ir_utils.copy.deepcopy(x)
            assert y == x and y is not x
            assert all(y[k] is not x[k] for k in x)
        assert deep == []                           # (sets of names: not copy.deepcopy's)
        z = ir_utils.copy.deepcopy(other)          # (not sets: copy.deepcopy's)
        assert z == other and z[1] is not other[1]
        assert deep
        memo = {}
        assert ir_utils.copy.deepcopy(flow, memo) == flow and memo
    finally:
        _numba_inline._compiles().pop()
    assert ir_utils.copy.copy is __import__("copy").copy


_LOC = ir.Loc("f", 1)


@pytest.mark.parametrize("x, names", [
    ({1: {("a", "b")}, 2: {("c", "d")}}, True), ({"x": {"a", "b"}}, True), ({1: set()}, True), ({}, True),
    ({1: {("a", 1)}}, False), ({1: {("a", "b"), "c"}}, False), ({1: {("a", ("b",))}}, False),
    ({1: {ir.Var(ir.Scope(None, _LOC), "a", _LOC)}}, False), ({1: [("a", "b")]}, False),
    ({1: frozenset({"a"})}, False), ({(1,): {"a"}}, False), ([{"a"}], False)])
def test_only_sets_of_names_are_copied_as_sets(x, names):
    assert _numba_inline._sets_of_names(x) is names
