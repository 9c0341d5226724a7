"""Derivatives through the detector's response (``detected=True``: the expected signal
E = adc + gain * PSF * (scale * calibration * photons)) and refinement against pixel
values: PSF width, gain, scale and offset beside the kernel's parameters."""

import numpy as np
import pytest

import nbragg
from nbragg.gradients import check_gradients, gradient, jacobian
from nbragg.response import respond

SMALL = ("-cell 100 100 100 90 90 90 -misset 10 20 30 -default_F 100 -N 5 -lambda 1 -distance 100 -pixel 0.2 "
         "-detpixels 24 -oversample 1")
NAMES = ["psf_fwhm", "gain", "response_scale", "adc", "background_thickness_0", "background_scale_0", "Na",
         "misset_z"]


def _small(psf):
    exp = nbragg.Experiment.from_nanobragg_args(SMALL.split(), warn=lambda m: None)
    return exp.replace(background=[nbragg.Material("water", thickness=0.05, scale=1e-6)],
                       response=nbragg.Response(psf=psf, psf_fwhm=300.0, gain=2.5, adc=40.0, scale=1.3,
                                                calibration=0.05, readout=3.0))


@pytest.mark.parametrize("psf", ["gauss", "fiber"])
def test_detected_gradients_match_central_differences(psf):
    check = check_gradients(_small(psf), NAMES, detected=True, seed=2)
    for label, a, num, err, h, sweep in check.rows:
        assert a != 0.0, label
        assert err <= 1e-6, f"{label}: analytic {a:.10e}, central difference {num:.10e} ({err:.2e})"


@pytest.mark.parametrize("psf", ["gauss", "fiber"])
def test_detected_jacobian_transpose_equals_gradient(psf):
    exp = _small(psf)
    w = np.random.default_rng(1).uniform(0.5, 1.5, (24, 24))
    g = gradient(exp, NAMES, w, detected=True)
    J, E = jacobian(exp, NAMES, detected=True, return_image=True)
    from nbragg.response import expected_signal
    np.testing.assert_array_equal(E, expected_signal(nbragg.simulate(exp).image, exp.response, 0.2))
    size = np.abs(J).T @ w.ravel()
    for i, n in enumerate(NAMES):
        assert abs(J[:, i] @ w.ravel() - g[n]) <= 1e-12 * size[i], n


def test_response_parameters_need_a_response_and_detected():
    exp = _small("gauss")
    w = np.ones((24, 24))
    with pytest.raises(nbragg.ParameterError, match="detected=True"):
        gradient(exp, ["gain"], w)
    bare = exp.replace(response=None)
    with pytest.raises(nbragg.ParameterError, match="Experiment.response is None"):
        jacobian(bare, ["Na"], detected=True)
    with pytest.raises(nbragg.ParameterError, match="'gain'.*no"):
        nbragg.get_params(bare, ["gain"])
    assert nbragg.get_params(exp, ["psf_fwhm", "response_scale"]) == {"psf_fwhm": 300.0, "response_scale": 1.3}
    with pytest.raises(nbragg.ParameterError, match="no PSF"):
        gradient(exp.replace(response=exp.response.replace(psf=None)), ["psf_fwhm"], w, detected=True)


# a crystal whose spots (about 15000 photons at the peak) fix the gain, on 0.5 um of water
# (about 900 photons per pixel) whose rings fix its thickness, seen through a Gaussian PSF
# of 1.5 pixels
TRUTH = {"psf_fwhm": 150.0, "background_thickness_0": 0.0005, "gain": 2.0}
START = {"psf_fwhm": 110.0, "background_thickness_0": 0.0007, "gain": 1.7}


def _shot(seed):
    exp = nbragg.Experiment.from_nanobragg_args(
        "-cell 50 50 50 90 90 90 -misset 10 20 30 -default_F 10000 -N 40 -lambda 1 -distance 100 -pixel 0.1 "
        "-detpixels 64 -oversample 2 -fluence 1e23".split(), warn=lambda m: None)
    truth = exp.replace(background=[nbragg.Material("water", thickness=TRUTH["background_thickness_0"])],
                        response=nbragg.Response(psf="gauss", psf_fwhm=TRUTH["psf_fwhm"], gain=TRUTH["gain"],
                                                 adc=40.0, readout=2.0, seed=seed))
    image = nbragg.simulate(truth, warn=lambda m: None).image
    observed = respond(image, truth.response, 0.1).adu.astype(float)
    return truth, observed


@pytest.mark.parametrize("method", ["least_squares", "lbfgs"])
@pytest.mark.parametrize("seed", [5, 6])
def test_refinement_recovers_psf_water_and_gain(method, seed):
    truth, observed = _shot(seed)
    start = nbragg.set_params(truth, START)
    fit = nbragg.refine(start, observed, list(TRUTH), loss="gaussian", method=method)
    assert fit.success, fit.message
    for n, v in TRUTH.items():
        sd = fit.uncertainties[n]
        assert 0 < sd < 0.05 * v, (n, sd)
        assert abs(fit.values[n] - v) <= 3 * sd, (n, fit.values[n], v, sd)


def test_poisson_refinement_with_read_out_noise():
    """The shifted-Poisson likelihood: the PSF and the water with gain and offset known."""
    truth, observed = _shot(7)
    start = nbragg.set_params(truth, {k: START[k] for k in ("psf_fwhm", "background_thickness_0")})
    fit = nbragg.refine(start, observed, ["psf_fwhm", "background_thickness_0"], loss="poisson")
    assert fit.success, fit.message
    for n in ("psf_fwhm", "background_thickness_0"):
        assert abs(fit.values[n] - TRUTH[n]) <= 3 * fit.uncertainties[n], (n, fit.values[n], fit.uncertainties[n])
    with pytest.raises(nbragg.ParameterError, match="gain and adc fixed"):
        nbragg.refine(start, observed, ["gain"], loss="poisson")
    with pytest.raises(nbragg.ParameterError, match="response.readout"):
        nbragg.refine(start, observed, ["psf_fwhm"], loss="gaussian", readout=2.0)


def test_pixel_selection_against_pixel_values():
    """Saturated pixels, pixels at 0 and pixels within the PSF's reach of the ROI's edge
    are left out of a fit against pixel values (the model is neither clipped nor lit from
    outside the ROI); a refinement on such a region still finds the truth."""
    from nbragg.refine import _detected_selection, _selection
    truth, observed = _shot(8)
    roi = (8, 55, 10, 50)
    truth = truth.replace(detector=truth.detector.replace(roi=roi))
    image = nbragg.simulate(truth, warn=lambda m: None).image
    observed = respond(image, truth.response, 0.1).adu.astype(float)
    observed[30, 30] = 65535.0
    observed[31, 30] = 0.0
    obs, sel = _selection(truth, observed, None)
    keep = _detected_selection(truth, obs, sel)
    r = 6                                   # ceil(3 x 1.5 px) + 1: the Gaussian kernel's radius
    inner = np.zeros_like(keep)
    inner[roi[2] + r:roi[3] - r + 1, roi[0] + r:roi[1] - r + 1] = True
    inner[30, 30] = inner[31, 30] = False
    np.testing.assert_array_equal(keep, inner)
    fit = nbragg.refine(nbragg.set_params(truth, START), observed, list(TRUTH), loss="gaussian")
    for n, v in TRUTH.items():
        assert abs(fit.values[n] - v) <= 3 * fit.uncertainties[n], (n, fit.values[n], v)


def test_expected_signal_of_a_panel_stack():
    """Each panel of a (panel, slow, fast) stack is blurred on its own."""
    from nbragg.response import expected_signal, signal_vjp
    r = nbragg.Response(psf="gauss", psf_fwhm=300.0, gain=2.0, adc=10.0)
    stack = np.random.default_rng(0).uniform(0, 100, (2, 12, 16))
    E = expected_signal(stack, r, 0.1)
    for p in range(2):
        np.testing.assert_allclose(E[p], expected_signal(stack[p], r, 0.1), rtol=1e-15)
    u = np.random.default_rng(1).normal(size=(2, 12, 16))
    # <u, dE(x)> == <vjp(u), x> for the linear part
    lin = expected_signal(stack, r, 0.1) - 10.0
    assert np.isclose(np.sum(u * lin), np.sum(signal_vjp(u, r, 0.1) * stack), rtol=1e-12)
