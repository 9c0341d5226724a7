"""Adjoint gradients and tangent Jacobians against central differences, per parameter
and configuration (float64): L = sum(w * I) with random w."""

import shutil

import numpy as np
import pytest

from conftest import GOLDEN

import nbragg
from nbragg.engine import build_model
from nbragg.gradients import check_gradients, gradient, jacobian
from nbragg.nbargs import parse_nanobragg_args
from nbragg.params import SCALAR_PARAMS

TRI = "-cell 70 80 90 75 85 95 -misset 10 5 3 -default_F 100 -N 5 -lambda 1.0 -distance 100 -pixel 0.4 -detpixels 16 -oversample 1"
ACTIVE = "-water 0.01 -polar 0.3"   # so that water and polar have gradients everywhere

CONFIGS = {
    "a_seed_cubic": "-cell 100 100 100 90 90 90 -default_F 100 -N 5 -lambda 6.2 -distance 100 -pixel 0.8 "
                    "-detpixels 16 -oversample 1 " + ACTIVE,
    "b_triclinic_misset": TRI + " " + ACTIVE,
    "c_mosaic_10": TRI + " -mosaic 1.0 -mosaic_dom 10 " + ACTIVE,
    "d_phi_3_steps": TRI + " -phi 2 -osc 3 -phisteps 3 " + ACTIVE,
    "e_divergence_dispersion": TRI + " -hdivrange 6 -vdivrange 4 -hdivsteps 3 -vdivsteps 2 -dispersion 4 "
                                     "-dispsteps 2 " + ACTIVE,
    "f_oversample_thickness_polar": TRI.replace("-oversample 1", "-oversample 2") + " -detector_abs 320 "
                                    "-detector_thick 450 -detector_thicksteps 3 " + ACTIVE,
    "g_xds_rotated_twotheta": TRI + " -xds -ORGX 7.5 -ORGY 9.25 -close_distance 95 -detector_rotx 2 -detector_roty -3 "
                              "-detector_rotz 4 -twotheta 5 " + ACTIVE,
    "g_mosflm_rotated_twotheta": TRI + " -mosflm -Xbeam 3.3 -Ybeam 3.1 -detector_rotx 3 -detector_roty -4 "
                                 "-detector_rotz 5 -twotheta 6 " + ACTIVE,
    "h_hkl_tricubic": TRI.replace("-default_F 100", "-hkl tri.hkl").replace("-N 5", "-N 2").replace(
        "-pixel 0.4", "-pixel 0.1") + " -interpolate " + ACTIVE,
}

# parameters that a configuration leaves without effect (exactly zero gradient)
INACTIVE = {
    "a_seed_cubic": {"mosaic_spread", "osc"},
    "b_triclinic_misset": {"mosaic_spread", "osc"},
    "c_mosaic_10": {"osc"},
    "d_phi_3_steps": {"mosaic_spread"},
    "e_divergence_dispersion": {"mosaic_spread", "osc"},
    "f_oversample_thickness_polar": {"mosaic_spread", "osc"},
    "g_xds_rotated_twotheta": {"mosaic_spread", "osc"},
    "g_mosflm_rotated_twotheta": {"mosaic_spread", "osc"},
    "h_hkl_tricubic": {"mosaic_spread", "osc"},
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("grad")
    shutil.copy(GOLDEN / "interpolate_N2" / "tri.hkl", d)
    return d


def _exp(name, inputs):
    return parse_nanobragg_args(CONFIGS[name].split(), cwd=str(inputs), warn=lambda m: None).experiment


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradient_matches_central_differences(name, inputs):
    exp = _exp(name, inputs)
    names = list(SCALAR_PARAMS) + (["Fhkl"] if exp.structure.Fhkl is not None else [])
    check = check_gradients(exp, names, seed=3)
    for label, a, num, err, h, sweep in check.rows:
        if label in INACTIVE[name]:
            # no mosaic spread (one domain) or no oscillation (one phi step): the
            # derivative of the smooth piece is 0 (any change of the value switches to
            # 10 domains or 2 steps, as in nanoBragg, so differences are not comparable)
            assert a == 0.0, (label, a)
            continue
        assert a != 0.0, label
        assert err <= 1e-6, f"{label}: analytic {a:.10e}, best central difference {num:.10e} ({err:.2e})\n" \
                            + check.sweep_table()
        # the error falls as step^2 while truncation dominates: a step sqrt(10) smaller
        # gives an error about 10 times smaller
        # (checked on the two largest steps, when both are well above the round-off floor)
        # (The interpolated structure factors are only C0 at integer indices, so large
        # steps there straddle kinks; the check applies to the other configurations.)
        errs = [e for _, _, e in sweep]
        if name != "h_hkl_tricubic" and errs[0] > 1e-7 and errs[1] > 30 * min(errs):
            assert 5.0 < errs[0] / errs[1] < 20.0, (label, errs)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_jacobian_transpose_equals_gradient(name, inputs):
    exp = _exp(name, inputs)
    names = list(SCALAR_PARAMS)
    model = build_model(exp, warn=lambda m: None)
    w = np.random.default_rng(5).uniform(0.5, 1.5, model.shape)
    g = gradient(exp, names, w)
    J = jacobian(exp, names)
    assert J.shape == (model.shape[0] * model.shape[1], len(names))
    jw = J.T @ w.ravel()
    # relative to sum |w_i J_ip|: the sum cancels for some parameters, and then its own
    # rounding is measured against the size of its terms
    size = np.abs(J).T @ w.ravel()
    for i, n in enumerate(names):
        assert abs(jw[i] - g[n]) <= 1e-12 * size[i], (n, jw[i], g[n], size[i])


def test_seed_case_cell_gradients_nonzero_and_zero_without_structure_factors(inputs):
    args = CONFIGS["a_seed_cubic"].replace(ACTIVE, "").split()
    exp = parse_nanobragg_args(args, warn=lambda m: None).experiment
    cell = ["cell_a", "cell_b", "cell_c", "cell_alpha", "cell_beta", "cell_gamma"]
    w = np.random.default_rng(0).uniform(0.5, 1.5, (16, 16))
    g = gradient(exp, cell, w)
    assert all(v != 0.0 for v in g.values()), g
    zero = exp.replace(structure=exp.structure.replace(default_F=0.0))
    assert np.all(nbragg.simulate(zero).image == 0.0)
    g0 = gradient(zero, list(SCALAR_PARAMS), w)
    assert all(v == 0.0 for v in g0.values()), g0
    assert np.all(jacobian(zero, list(SCALAR_PARAMS)) == 0.0)


def test_fhkl_gradient_entry_by_entry(inputs):
    exp = _exp("h_hkl_tricubic", inputs)
    check = check_gradients(exp, ["Fhkl"], seed=1)
    assert len(check.rows) == 3
    assert all(err <= 1e-6 for _, a, _, err, _, _ in check.rows), check.table()


@pytest.mark.parametrize("domains", [3, 10])
def test_fhkl_gradient_on_the_vectorised_path(inputs, domains):
    """Nearest F from a grid, with few orientations (the scalar loop) and with more than
    eight (the vector passes of square_partials and its F scatter)."""
    from nbragg.kernels.cpu import fast_path
    args = (CONFIGS["h_hkl_tricubic"].replace(" -interpolate", " -nointerpolate")
            + f" -mosaic 0.5 -mosaic_dom {domains}")
    exp = parse_nanobragg_args(args.split(), cwd=str(inputs), warn=lambda m: None).experiment
    assert fast_path(build_model(exp, warn=lambda m: None).scene)
    check = check_gradients(exp, ["Fhkl"], seed=1)
    assert len(check.rows) == 3
    assert all(err <= 1e-6 for _, a, _, err, _, _ in check.rows), check.table()


@pytest.mark.parametrize("name", ["c_mosaic_10", "f_oversample_thickness_polar"])
def test_gradients_identical_for_one_and_two_threads(name, inputs):
    import numba
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 threads")
    exp = _exp(name, inputs)
    w = np.random.default_rng(2).uniform(0.5, 1.5, (16, 16))
    a = gradient(exp, list(SCALAR_PARAMS), w, threads=1)
    b = gradient(exp, list(SCALAR_PARAMS), w, threads=2)
    assert a == b
    ja = jacobian(exp, list(SCALAR_PARAMS), threads=1)
    jb = jacobian(exp, list(SCALAR_PARAMS), threads=2)
    assert ja.tobytes() == jb.tobytes()


def test_adjoint_returns_the_image_of_a_one_pixel_detector():
    from nbragg.gradients import raw_gradient
    exp = nbragg.Experiment.from_nanobragg_args(
        "-cell 70 80 90 75 85 95 -misset 10 5 3 -default_F 100 -N 5 -lambda 1 -distance 100 -detpixels 1 "
        "-pixel 0.5 -oversample 2".split(), warn=lambda m: None)
    model = build_model(exp, warn=lambda m: None)
    raw = raw_gradient(model, np.ones(model.shape), want_image=True)
    ref = nbragg.simulate(exp).image
    assert ref.shape == (1, 1) and ref[0, 0] > 0
    np.testing.assert_allclose(raw.image, ref, rtol=1e-12)
