"""The amorphous background (nonBragg's term, Experiment.background) against the numpy
reference, one feature at a time (1e-12), with and without a Bragg term."""

import numpy as np
import pytest

from conftest import GOLDEN
from reference import reference_image

import nbragg
from nbragg import Material
from nbragg.nbargs import parse_nanobragg_args

# (an explicit -oversample: the automatic one is an integer of the distance, which central
# differences in the distance would step across; features may give their own)
BASE = "-cell 70 80 90 75 85 95 -misset 10 5 3 -N 5 -lambda 1.0 -distance 40 -pixel 0.8 -detpixels 10 -oversample 1".split()
# the pixels' sin(theta)/lambda runs from about 0.002 to 0.07 1/A: below the table, its
# first and last intervals (quadratic), inside it (cubic) and beyond it (linear), where
# F turns negative
TABLE = np.array([[0.004, 2.6], [0.012, 2.4], [0.02, 1.8], [0.03, 3.5], [0.04, 4.2], [0.05, 2.0], [0.06, -0.5]])

FEATURES = {
    "plain": [],
    "oversample": ["-oversample", "3"],
    "divergence_dispersion": ["-hdivrange", "8", "-vdivrange", "6", "-hdivsteps", "3", "-vdivsteps", "3",
                              "-dispersion", "6", "-dispsteps", "3"],
    "polar": ["-polar", "0.6", "-oversample", "2"],
    "nopolar_point_pixel": ["-nopolar", "-point_pixel"],
    "thickness": ["-oversample", "2", "-detector_abs", "320", "-detector_thick", "450", "-detector_thicksteps", "3"],
    "oversample_flags": ["-oversample", "2", "-oversample_omega", "-oversample_polar", "-polar", "0.5"],
    "curved": ["-curved_det", "-oversample", "2"],
    "rotations_roi": ["-mosflm", "-Xbeam", "2", "-Ybeam", "2.5", "-detector_roty", "-4", "-twotheta", "6",
                      "-roi", "2", "7", "3", "8"],
    "mosaic_phi": ["-mosaic", "1.5", "-mosaic_dom", "3", "-phi", "0", "-osc", "2", "-phisteps", "2"],
    "dmin_does_not_cut": ["-dmin", "4"],
    "sourcefile": ["-sourcefile", "sources.txt"],
}


def _experiment(extra, bragg, tmp_path, materials=None):
    """BASE with the feature's flags, a Bragg term or none, and two materials (a table
    given as an array, which goes negative at the end, and the shipped water)."""
    import shutil
    shutil.copy(GOLDEN / "sourcefile_round_xtal" / "sources.txt", tmp_path)
    exp = parse_nanobragg_args(BASE + extra + ["-default_F", "100"], cwd=str(tmp_path), warn=lambda m: None).experiment
    if not bragg:
        exp = exp.replace(structure=exp.structure.replace(default_F=0.0))
    if materials is None:
        # with a Bragg term, scaled to the spots' size so that both terms count
        s = 1e-12 if bragg else 1.0
        materials = [Material(TABLE, thickness=0.2, width=0.05, height=0.05, scale=s),
                     Material("water", units="stol", thickness=0.1, scale=0.5 * s)]
    return exp.replace(background=materials)


def _close(image, ref, tol=1e-12):
    assert np.abs(ref).max() > 0
    err = np.abs(image - ref) / np.maximum(np.abs(ref), 1e-12 * np.abs(ref).max())
    assert err.max() <= tol, err.max()


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("bragg", [False, True], ids=["background_only", "with_bragg"])
def test_background_matches_reference(feature, bragg, tmp_path):
    exp = _experiment(FEATURES[feature], bragg, tmp_path)
    result = nbragg.simulate(exp, warn=lambda m: None)
    _close(result.image, reference_image(result.model))


def test_source_weights_weigh_the_background(tmp_path):
    """Beam.source_weights: each source's terms carry its file weight (nonBragg.c)."""
    exp = _experiment(FEATURES["sourcefile"], False, tmp_path)
    plain = nbragg.simulate(exp, warn=lambda m: None)
    weighted = nbragg.simulate(exp.replace(beam=exp.beam.replace(source_weights=True)), warn=lambda m: None)
    w = weighted.model.scene.beam.weights
    assert not np.all(w == 1.0)
    _close(weighted.image, reference_image(weighted.model))
    assert not np.allclose(weighted.image, plain.image)


def test_background_is_linear_in_scale_and_thickness(tmp_path):
    m = Material("water", thickness=0.1)
    exp = _experiment([], False, tmp_path, [m])
    a = nbragg.simulate(exp, warn=lambda msg: None).image
    b = nbragg.simulate(exp.replace(background=[m.replace(scale=3.0)]), warn=lambda msg: None).image
    c = nbragg.simulate(exp.replace(background=[m.replace(thickness=0.25)]), warn=lambda msg: None).image
    np.testing.assert_allclose(b, 3.0 * a, rtol=1e-14)
    np.testing.assert_allclose(c, 2.5 * a, rtol=1e-14)


# ----------------------------------------------------------------------------- gradients

# the background's own parameters, the geometry, sources and polarization it depends on, and
# a few of the crystal's (whose kernels now carry the background's sum beside them)
GRAD_PARAMS = ["background_scale_0", "background_scale_1", "background_thickness_0", "background_thickness_1",
               "distance", "beam_x", "beam_y", "detector_rotx", "twotheta", "wavelength", "polar",
               "Na", "misset_y", "fluence", "mosaic_spread"]
GRAD_FEATURES = ["polar", "thickness", "oversample_flags", "mosaic_phi", "divergence_dispersion", "curved",
                 "sourcefile"]


@pytest.mark.parametrize("feature", GRAD_FEATURES)
def test_background_gradients_match_central_differences(feature, tmp_path):
    """The adjoint gradient in every parameter the background depends on against central
    differences."""
    from nbragg.gradients import check_gradients
    exp = _experiment(FEATURES[feature] + ["-polar", "0.6"], True, tmp_path)
    names = [n for n in GRAD_PARAMS if n != "mosaic_spread" or feature == "mosaic_phi"]
    # on the curved detector the beam centre's central differences converge only below
    # 1e-4 mm (the Bragg image alone too): a sweep from there
    steps = {"beam_x": 1e-4, "beam_y": 1e-4} if feature == "curved" else None
    check = check_gradients(exp, names, seed=4, steps=steps)
    for label, a, num, err, h, sweep in check.rows:
        assert a != 0.0, label
        assert err <= 1e-6, f"{label}: analytic {a:.10e}, central difference {num:.10e} ({err:.2e})"


@pytest.mark.parametrize("feature", ["polar", "thickness", "oversample_flags", "curved"])
def test_background_jacobian_transpose_equals_gradient(feature, tmp_path):
    """The tangent kernel's J^T w against the adjoint's gradient, and the tangent pass's
    image against the forward's, bit for bit."""
    from nbragg.engine import build_model
    from nbragg.gradients import gradient, jacobian
    exp = _experiment(FEATURES[feature], True, tmp_path)
    names = GRAD_PARAMS[:-1]
    model = build_model(exp, warn=lambda m: None)
    w = np.random.default_rng(5).uniform(0.5, 1.5, model.shape)
    g = gradient(exp, names, w)
    J, image = jacobian(exp, names, return_image=True)
    assert np.array_equal(image, nbragg.simulate(exp, warn=lambda m: None).image)
    jw = J.T @ w.ravel()
    size = np.abs(J).T @ w.ravel()
    for i, n in enumerate(names):
        assert abs(jw[i] - g[n]) <= 1e-12 * size[i], (n, jw[i], g[n], size[i])


def test_background_parameters_get_and_set(tmp_path):
    exp = _experiment([], False, tmp_path)
    v = nbragg.get_params(exp, ["background_scale_1", "background_thickness_0"])
    assert v == {"background_scale_1": 0.5, "background_thickness_0": 0.2}
    exp2 = nbragg.set_params(exp, {"background_scale_1": 2.0, "background_thickness_0": 0.3})
    assert exp2.background[1].scale == 2.0 and exp2.background[0].thickness == 0.3
    assert exp.background[1].scale == 0.5
    with pytest.raises(nbragg.ParameterError, match="background_scale_2.*2 background material"):
        nbragg.get_params(exp, ["background_scale_2"])
    with pytest.raises(nbragg.ParameterError, match="unknown parameter"):
        nbragg.get_params(exp, ["background_density_0"])


def test_background_only_gradients_match_central_differences(tmp_path):
    """Without a Bragg term the kernels skip the Bragg blocks (the walk and the fast
    adjoint): the background's gradients alone, and J^T w against them."""
    from nbragg.gradients import check_gradients, gradient, jacobian
    exp = _experiment(FEATURES["oversample"] + ["-polar", "0.6"], False, tmp_path)
    names = ["background_scale_0", "background_scale_1", "background_thickness_0", "fluence", "distance", "beam_x",
             "wavelength", "polar"]
    for label, a, num, err, h, sweep in check_gradients(exp, names, seed=6).rows:
        assert a != 0.0 and err <= 1e-6, (label, a, num, err)
    w = np.random.default_rng(2).uniform(0.5, 1.5, (10, 10))
    g = gradient(exp, names, w)
    J = jacobian(exp, names)
    for i, n in enumerate(names):
        assert abs(J[:, i] @ w.ravel() - g[n]) <= 1e-12 * (np.abs(J[:, i]) @ w.ravel()), n


@pytest.mark.parametrize("name", ["water", "ice", "nanoice", "air", "helium"])
def test_shipped_tables_read_and_are_increasing(name):
    """Every shipped table reads without warnings, rises in sin(theta)/lambda, starts at
    0 and holds finite F; helium's F(0) is its two electrons."""
    m = Material(name)
    assert m.notes == ()
    t = m.parsed
    assert t.stol[0] == 0.0 and np.all(np.diff(t.stol) > 0) and np.all(np.isfinite(t.F))
    if name == "helium":
        assert t.F[0] == 2.0 and 0.0 < t.F[-1] < 2.0
    with pytest.raises(nbragg.ParameterError, match="units"):
        Material(name, units="Q")


@pytest.mark.parametrize("seed", [1, 2])
def test_a_water_ring_refines_distance_and_beam_centre(seed):
    """Water alone on a 48x48 detector: the distance, the beam centre and the water's
    thickness from a Poisson image, started 2 mm, 0.8 mm and 20 % away, within 3
    reported standard uncertainties."""
    exp = nbragg.Experiment.from_nanobragg_args(
        "-cell 100 100 100 90 90 90 -default_F 100 -N 5 -lambda 1 -distance 60 -pixel 1.0 -detpixels 48 "
        "-oversample 1 -fluence 1e16".split(), warn=lambda m: None)
    exp = exp.replace(structure=exp.structure.replace(default_F=0.0), background=[Material("water", thickness=0.1)])
    truth = {"distance": 60.0, "beam_x": 24.5, "background_thickness_0": 0.1}
    assert nbragg.get_params(exp, list(truth)) == truth
    observed = np.random.default_rng(seed).poisson(nbragg.simulate(exp).image).astype(float)
    start = nbragg.set_params(exp, {"distance": 62.0, "beam_x": 25.3, "background_thickness_0": 0.12})
    fit = nbragg.refine(start, observed, list(truth), loss="poisson")
    assert fit.success, fit.message
    for n, v in truth.items():
        assert abs(fit.values[n] - v) <= 3 * fit.uncertainties[n], (n, fit.values[n], fit.uncertainties[n])
