"""Refinement: recover known parameters from Poisson images, calibrated uncertainties,
and the command line against nanoBragg.c's own noise images."""

import io
import json
import shutil
import sys

import numpy as np
import pytest

from conftest import GOLDEN

import nbragg
from nbragg import refine_cli
from nbragg.nbargs import parse_nanobragg_args
from nbragg.params import get_params, set_params
from nbragg.refine import RefinementError, refine

TRI = ("-cell 70 80 90 75 85 95 -misset 10 5 3 -default_F 100 -N 5 -lambda 1.0 -distance 100 -pixel 0.2 "
       "-detpixels 128 -oversample 1")
PERTURB = {"cell_a": 0.7, "cell_b": -0.8, "cell_c": 0.9, "cell_alpha": 0.5, "cell_beta": -0.5, "cell_gamma": 0.5,
           "misset_x": 0.2, "misset_y": -0.2, "misset_z": 0.2, "Na": 1, "Nb": -1, "Nc": 1, "distance": 1.0,
           "beam_x": 0.4, "beam_y": -0.4}   # cell 1 %, angles 0.5 deg, misset 0.2 deg, N +-1, 1 mm, 2 pixels


@pytest.fixture(scope="module")
def truth_and_observed():
    truth = parse_nanobragg_args(TRI.split(), warn=lambda m: None).experiment
    img = nbragg.simulate(truth, warn=lambda m: None).image
    obs = np.random.default_rng(1).poisson(img).astype(float)
    return truth, obs


@pytest.mark.slow
def test_both_methods_recover_all_parameters_from_perturbed_start(truth_and_observed):
    truth, obs = truth_and_observed
    names = list(PERTURB)
    tv = get_params(truth, names)
    start = set_params(truth, {n: tv[n] + PERTURB[n] for n in names})
    fits = {}
    for method in ("least_squares", "lbfgs"):
        fit = refine(start, obs, names, method=method, blur=[4, 2, 1])
        for n in names:
            z = (fit.values[n] - tv[n]) / fit.uncertainties[n]
            assert abs(z) <= 3.0, (method, n, fit.values[n], tv[n], fit.uncertainties[n])
        assert fit.nfev > 0 and fit.history and fit.history[-1] <= fit.history[0]
        fits[method] = fit
    a, b = fits["least_squares"], fits["lbfgs"]
    assert a.final_loss == pytest.approx(b.final_loss, rel=1e-7)
    for n in names:
        assert abs(a.values[n] - b.values[n]) <= 0.05 * a.uncertainties[n], n
    assert "cell_a" in a.table()


def test_uncertainties_match_scatter_over_noise_seeds():
    args = TRI.replace("-pixel 0.2 -detpixels 128", "-pixel 0.25 -detpixels 96") + " -fluence 2e28"
    truth = parse_nanobragg_args(args.split(), warn=lambda m: None).experiment
    img = nbragg.simulate(truth, warn=lambda m: None).image
    names = ["cell_a", "cell_gamma", "misset_y", "Nb", "distance", "beam_x", "beam_y"]
    tv = get_params(truth, names)
    vals, sds = [], []
    for seed in range(16):
        obs = np.random.default_rng(200 + seed).poisson(img).astype(float)
        fit = refine(truth, obs, names)
        vals.append([fit.values[n] for n in names])
        sds.append([fit.uncertainties[n] for n in names])
    vals, sds = np.array(vals), np.array(sds)
    for i, n in enumerate(names):
        scatter = vals[:, i].std(ddof=1)
        ratio = scatter / sds[:, i].mean()
        assert 0.5 <= ratio <= 2.0, (n, scatter, sds[:, i].mean())
        assert abs(vals[:, i].mean() - tv[n]) <= 3 * scatter / np.sqrt(len(vals)) + 1e-12, n
        assert np.mean(np.abs((vals[:, i] - tv[n]) / sds[:, i]) <= 3.0) >= 0.9, n


@pytest.mark.parametrize("loss", ["gaussian", "l2"])
def test_other_losses_converge(truth_and_observed, loss):
    truth, obs = truth_and_observed
    names = ["misset_z", "Nb", "beam_x"]
    tv = get_params(truth, names)
    start = set_params(truth, {"misset_z": tv["misset_z"] + 0.05, "Nb": 5.3, "beam_x": tv["beam_x"] + 0.05})
    fits = [refine(start, obs, names, loss=loss, method=m, readout=1.0) for m in ("least_squares", "lbfgs")]
    # both methods find the same minimum of the same objective.  (The Gaussian loss holds
    # its variance fixed for a solve and refreshes it until the parameters move less than
    # 1e-7 of themselves; its final loss, with the variance of the answer, is not
    # stationary there, so it differs at first order in whatever the two paths leave at
    # that level, about 1e-8 of it: the methods are compared through the parameters.)
    if loss == "l2":
        assert fits[0].final_loss == pytest.approx(fits[1].final_loss, rel=1e-8)
    for n in names:
        assert abs(fits[0].values[n] - fits[1].values[n]) <= 1e-3 * fits[0].uncertainties[n], (loss, n)
    # unweighted least squares on Poisson counts is a poorer estimator than the
    # likelihood; its sandwich uncertainty still covers the truth within a few sd
    limit = 3.0 if loss == "gaussian" else 5.0
    for fit in fits:
        for n in names:
            assert abs(fit.values[n] - tv[n]) <= limit * fit.uncertainties[n], (loss, fit.method, n)


def test_stages_and_gradient_check(truth_and_observed):
    truth, obs = truth_and_observed
    names = ["misset_z", "Nb"]
    start = set_params(truth, {"misset_z": 3.05, "Nb": 5.4})
    fit = refine(start, obs, names, stages=[["misset_z"], ["Nb"]], check_gradients=True)
    assert fit.values["Nb"] == pytest.approx(5.0, abs=3 * fit.uncertainties["Nb"])
    with pytest.raises(RefinementError, match="disagree"):
        refine(start, obs, names, check_gradients=True, gradient_tolerance=0.0)


def test_bad_inputs_raise_clear_errors(truth_and_observed):
    truth, obs = truth_and_observed
    with pytest.raises(RefinementError, match="shape"):
        refine(truth, obs[:10], ["Nb"])
    with pytest.raises(nbragg.ParameterError, match="unknown parameter"):
        refine(truth, obs, ["Nbb"])
    with pytest.raises(nbragg.ParameterError, match="loss"):
        refine(truth, obs, ["Nb"], loss="cauchy")
    with pytest.raises(RefinementError, match="negative"):
        refine(truth, obs - 100, ["Nb"])


def _cli(tmp_path, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    assert refine_cli.run(argv, stdout=out) == 0
    return json.loads((tmp_path / "fit.json").read_text()), out.getvalue()


def test_cli_refines_golden_cubic_noise_image(tmp_path, monkeypatch):
    shutil.copy(GOLDEN / "cubic_default_F" / "noiseimage.img", tmp_path)
    start = ("-cell 100 100 100 90 90 90 -misset 0.1 -0.1 0.15 -default_F 100 -Na 6 -Nb 4 -Nc 5 -lambda 6.2 "
             "-distance 100 -Xbeam 6.55 -Ybeam 6.3 -pixel 0.1 -detpixels 128").split()
    names = ["misset_x", "misset_y", "misset_z", "Na", "Nb", "Nc", "beam_x", "beam_y"]
    rep, log = _cli(tmp_path, monkeypatch, ["noiseimage.img", "--refine", ",".join(names), "--report", "fit.json",
                                            "--"] + start)
    truth = {"misset_x": 0.0, "misset_y": 0.0, "misset_z": 0.0, "Na": 5.0, "Nb": 5.0, "Nc": 5.0,
             "beam_x": 6.45, "beam_y": 6.45}
    for n in names:
        assert abs(rep["values"][n] - truth[n]) <= 3 * rep["uncertainties"][n], (n, rep["values"][n])
    assert rep["nfev"] > 0 and len(rep["loss_history"]) >= rep["nfev"] // 2
    # the refined command line (an A matrix for the crystal, whole N) gives the refined
    # model's image
    refined = parse_nanobragg_args(rep["nanobragg_args"], cwd=str(tmp_path), warn=lambda m: None).experiment
    want = dict(rep["values"])
    for n in ("Na", "Nb", "Nc"):
        want[n] = round(want[n])
    model = set_params(parse_nanobragg_args(start, warn=lambda m: None).experiment, want)
    a = nbragg.simulate(refined, warn=lambda m: None).image
    b = nbragg.simulate(model, warn=lambda m: None).image
    assert np.allclose(a, b, rtol=1e-6, atol=1e-9 * b.max())


@pytest.mark.slow
@pytest.mark.slow
def test_cli_refines_golden_mat_hkl_noise_image_with_mask_and_overloads(tmp_path, monkeypatch):
    for f in ("noiseimage.img", "A.mat", "P1.hkl", "mask.img"):
        shutil.copy(GOLDEN / "mat_hkl_nearest_nonsquare_mask" / f, tmp_path)
    start = ("-mat A.mat -misset 0.1 -0.1 0.1 -hkl P1.hkl -lambda 6.2 -Na 9 -Nb 11 -Nc 10 -distance 100 "
             "-Xbeam 8.2 -Ybeam 12.6 -pixel 0.1 -detpixels_f 256 -detpixels_s 160 -mask mask.img -fluence 4e29").split()
    names = ["misset_x", "misset_y", "misset_z", "Na", "Nb", "beam_x", "beam_y"]
    rep, _ = _cli(tmp_path, monkeypatch, ["noiseimage.img", "--adc", "10", "--refine", ",".join(names),
                                          "--report", "fit.json", "--"] + start)
    truth = {"misset_x": 0.0, "misset_y": 0.0, "misset_z": 0.0, "Na": 10.0, "Nb": 10.0, "beam_x": 8.05,
             "beam_y": 12.85}
    for n in names:
        assert abs(rep["values"][n] - truth[n]) <= 3 * rep["uncertainties"][n], (n, rep["values"][n])


@pytest.mark.parametrize("argv,needle", [
    (["missing.img", "--refine", "Nb", "--", "-cell", "100", "100", "100", "90", "90", "90", "-default_F", "1"],
     "missing.img"),
    (["obs.bin", "--refine", "Nb"], "after '--'"),
    (["obs.bin", "--refine", "Nbb", "--", "-cell", "100", "100", "100", "90", "90", "90", "-default_F", "1",
      "-detpixels", "4"], "Nbb"),
    (["obs.bin", "--refine", "Nb", "--", "-cell", "100", "100", "100", "90", "90", "90", "-default_F", "1",
      "-detpixels", "8"], "16 floats"),
])
def test_cli_errors(tmp_path, monkeypatch, capsys, argv, needle):
    monkeypatch.chdir(tmp_path)
    np.zeros(16, dtype="<f4").tofile(tmp_path / "obs.bin")
    assert refine_cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err


def test_bounds_start_inside_and_a_fit_on_a_bound_is_not_a_success(truth_and_observed):
    truth, obs = truth_and_observed
    a = get_params(truth, ["cell_a"])["cell_a"]
    start = set_params(truth, {"cell_a": a - 0.7})
    # the default bounds follow the start: a cell edge may not halve
    fit = refine(start, obs, ["cell_a"], max_nfev=3)
    assert fit.bounds["cell_a"] == pytest.approx((0.8 * (a - 0.7), 1.25 * (a - 0.7)))
    with pytest.raises(nbragg.ParameterError, match=r"cell_a starts at 69.3, outside its bounds \(69.5, 71\)"):
        refine(start, obs, ["cell_a"], bounds={"cell_a": (69.5, 71.0)})
    with pytest.raises(nbragg.ParameterError, match="'Na' is not among the refined parameters"):
        refine(start, obs, ["cell_a"], bounds={"Na": (1, 9)})
    # the minimum (cell_a = 70) lies beyond the upper bound: the fit stops there and says so
    for method in ("least_squares", "lbfgs"):
        fit = refine(start, obs, ["cell_a"], method=method, bounds={"cell_a": (69.0, 69.6)})
        assert fit.at_bounds == {"cell_a": "upper"} and not fit.success, (method, fit.values, fit.message)
        assert "cell_a at its upper bound 69.6" in fit.message
    # a value at a physical limit is an answer, not a stop: no water stays at 0
    fit = refine(start, obs, ["cell_a", "water"], max_nfev=5)
    assert fit.values["water"] < 1e-6 and "water" not in fit.at_bounds


def test_objective_does_not_depend_on_which_pass_ran_first(monkeypatch):
    """A Jacobian pass supplies the model image as well (no second forward pass); the
    residuals at a point are the same whether fun or jac was called there first."""
    from nbragg.refine import _Problem, _selection
    exp = parse_nanobragg_args(TRI.replace("-detpixels 128", "-detpixels 32").split(), warn=lambda m: None).experiment
    obs, sel = _selection(exp, np.random.default_rng(2).poisson(nbragg.simulate(exp).image).astype(float), None)
    names = ["cell_a", "Na", "distance"]
    theta = np.array([70.3, 5.0, 100.5])
    for sigma in (0.0, 1.0):
        fun_first = _Problem(exp, obs, names, "poisson", sel, None, 0.0, sigma)
        r_fun = fun_first.fun(theta)
        J_after = fun_first.jac(theta)
        jac_first = _Problem(exp, obs, names, "poisson", sel, None, 0.0, sigma)
        with monkeypatch.context() as mp:     # the Jacobian pass alone serves both
            mp.setattr(sys.modules["nbragg.refine"], "render", lambda *a, **k: pytest.fail("a second, forward pass ran"))
            J_first = jac_first.jac(theta)
            r_jac_first = jac_first.fun(theta)
        np.testing.assert_array_equal(r_jac_first, r_fun)
        np.testing.assert_array_equal(J_first, J_after)
        assert np.any(J_first != 0)
