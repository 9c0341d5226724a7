"""Checks shared by the tests of nbragg's own model terms: the CUDA backend (the
simulator here) against the CPU, and the tangent kernel's J^T u against the adjoint."""

import numpy as np
import pytest

import nbragg

QUIET = dict(warn=lambda m: None)


def assert_cuda_equals_cpu(exp, names, seed=3, jacobian=True):
    """The image to 1e-12 of its maximum, and the gradients of ``names`` (and, with
    ``jacobian``, the CUDA tangent kernel's J^T u) to 1e-12 (1e-11)."""
    cpu = nbragg.simulate(exp, **QUIET).image
    gpu = nbragg.simulate(exp, backend="cuda", **QUIET).image
    assert cpu.max() > 0
    assert np.abs(gpu - cpu).max() <= 1e-12 * cpu.max()
    u = np.random.default_rng(seed).uniform(0.5, 1.5, cpu.shape)
    a = nbragg.gradient(exp, names, u)
    b = nbragg.gradient(exp, names, u, backend="cuda")
    for n in names:
        np.testing.assert_allclose(b[n], a[n], rtol=1e-12, atol=1e-12 * np.max(np.abs(a[n])))
    if jacobian:
        J = nbragg.jacobian(exp, names, backend="cuda")
        for p, n in enumerate(names):
            assert J[:, p] @ u.ravel() == pytest.approx(a[n], rel=1e-11)


def assert_jacobian_matches_gradient(exp, names, seed):
    """The tangent kernel's J^T u equals the adjoint's gradient to 1e-12 of sum |J| u."""
    J = nbragg.jacobian(exp, names)
    shape = nbragg.simulate(exp, **QUIET).image.shape
    u = np.random.default_rng(seed).uniform(0.5, 1.5, shape)
    g = nbragg.gradient(exp, names, u)
    size = np.abs(J).T @ u.ravel()
    for p, n in enumerate(names):
        assert abs(J[:, p] @ u.ravel() - g[n]) <= 1e-12 * size[p], n


def assert_matches_reference(exp):
    """The kernels' image equals tests/reference.py's numpy model to 1e-12 of its maximum."""
    from reference import reference_image
    image = nbragg.simulate(exp, **QUIET).image
    ref = reference_image(nbragg.build_model(exp, **QUIET))
    assert image.max() > 0
    assert np.abs(image - ref).max() <= 1e-12 * ref.max()
    return image


def assert_derivatives(exp, names, seed, steps=None):
    """The adjoint's gradients of ``names`` against central differences (1e-6), and the
    tangent kernel against the adjoint."""
    check = nbragg.check_gradients(exp, names, steps=steps)
    assert check.max_error < 1e-6, check.table()
    assert_jacobian_matches_gradient(exp, names, seed)
