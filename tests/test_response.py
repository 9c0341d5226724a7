"""The detector response in the Python API (nbragg.Response): each stage on its own, the
PSF against independent formulas, determinism, and simulate's Result.detected."""

import numba
import numpy as np
import pytest

import nbragg
from nbragg import noisify as C
from nbragg.errors import ParameterError
from nbragg.response import blur, calibration_pattern, fiber_kernel, gauss_weights, poisson_counts, respond


def test_gaussian_psf_is_the_pixel_integral_of_a_2d_gaussian():
    """The separable weights' outer product equals noisify.c's 2D pixel integral
    (computed independently, from the 2D error-function product), both normalised."""
    fwhm, r = 2.3, 7
    w = gauss_weights(fwhm, r)
    c = np.array([[C._pixel_weight(C.GAUSS, dx, dy, fwhm, 0.0) for dx in range(-r, r + 1)] for dy in range(-r, r + 1)])
    np.testing.assert_allclose(np.outer(w, w), c / c.sum(), rtol=1e-9, atol=1e-15)
    k = fiber_kernel(fwhm, r)
    g = fwhm * C.G_PER_FWHM
    cf = np.array([[C._pixel_weight(C.FIBER, dx, dy, fwhm, g) for dx in range(-r, r + 1)] for dy in range(-r, r + 1)])
    np.testing.assert_allclose(k, cf, rtol=1e-12, atol=1e-15)
    # the light beyond the square lies between the tails beyond its inner and outer circles
    assert g / np.hypot(g, np.sqrt(2) * (r + 0.5)) < 1 - k.sum() < g / np.hypot(g, r + 0.5)


@pytest.mark.parametrize("kind", ["gauss", "fiber"])
def test_blur_is_a_convolution_that_keeps_the_light_on_the_detector(kind):
    from scipy import signal
    rng = np.random.default_rng(3)
    image = np.zeros((40, 52))
    image[10:30, 12:40] = rng.uniform(0, 10, (20, 28))
    out = blur(image, kind, 1.7, radius=6)
    ref = signal.convolve2d(image, np.outer(gauss_weights(1.7, 6), gauss_weights(1.7, 6)) if kind == "gauss"
                            else fiber_kernel(1.7, 6), mode="same")
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    # light far from the edges stays (the fiber's, inside its radius)
    kept = 1.0 if kind == "gauss" else fiber_kernel(1.7, 6).sum()
    assert out.sum() == pytest.approx(image.sum() * kept, rel=1e-12)
    # the default radius (3 FWHM for the Gaussian; for the fiber, the whole detector here)
    # loses nothing that matters
    wide = blur(image, kind, 1.7, radius=60)
    np.testing.assert_allclose(blur(image, kind, 1.7), wide, rtol=0, atol=(1e-9 if kind == "gauss" else 1e-6)
                               * image.max())


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="one thread only")
def test_poisson_counts_do_not_depend_on_the_thread_count():
    lam = np.random.default_rng(0).uniform(0, 20, (700, 800))     # several blocks
    prev = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        a = poisson_counts(lam, [5, 3])
        numba.set_num_threads(2)
        b = poisson_counts(lam, [5, 3])
    finally:
        numba.set_num_threads(prev)
    np.testing.assert_array_equal(a, b)
    assert abs((a - lam).mean()) < 0.02 and (a - lam).var() / lam.mean() == pytest.approx(1.0, rel=0.02)


def test_stages_flicker_calibration_gain_offset_readout_and_clipping():
    image = np.full((60, 70), 100.0)
    # flicker alone: one factor for the whole image
    d = respond(image, nbragg.Response(noise=False, flicker=0.1, adc=0.0, bits=32), 0.1)
    ratio = d.counts / image
    assert np.ptp(ratio) == 0 and ratio.flat[0] != 1.0
    # calibration: a fixed pattern, whatever the seed; another calibration_seed, another pattern
    r = nbragg.Response(noise=False, calibration=0.05, adc=0.0)
    a = respond(image, r, 0.1, seed=1).counts
    b = respond(image, r, 0.1, seed=2).counts
    np.testing.assert_array_equal(a, b)
    assert np.std(a / image) == pytest.approx(0.05, rel=0.1)
    assert not np.array_equal(a, respond(image, r.replace(calibration_seed=7), 0.1).counts)
    np.testing.assert_allclose(a / image, calibration_pattern(r, image.shape), rtol=1e-15)
    # gain, offset, read-out noise, truncation
    d = respond(image, nbragg.Response(noise=False, gain=2.0, adc=10.0, readout=3.0), 0.1)
    adu = d.adu.astype(float)
    assert adu.mean() == pytest.approx(210.0, abs=0.2) and adu.std() == pytest.approx(3.0, rel=0.05)
    # clipping and overload counts, 16 and 32 bits
    d = respond(np.array([[0.0, 1e5]]), nbragg.Response(noise=False, adc=-5.0), 0.1)
    assert d.adu.dtype == np.uint16 and d.adu.tolist() == [[0, 65535]] and (d.overloads, d.underloads) == (1, 1)
    d = respond(np.array([[1e5]]), nbragg.Response(noise=False, bits=32, adc=0.0), 0.1)
    assert d.adu.dtype == np.uint32 and d.adu[0, 0] == 100000 and d.overloads == 0


def test_same_seed_same_pixels_and_panels_one_by_one():
    image = np.random.default_rng(1).uniform(0, 30, (2, 20, 24))
    r = nbragg.Response(psf="gauss", psf_fwhm=150.0, readout=2.0, flicker=0.02)
    a = respond(image, r, 0.1)
    np.testing.assert_array_equal(a.adu, respond(image, r, 0.1).adu)
    assert a.adu.shape == (2, 20, 24)
    assert not np.array_equal(a.adu, respond(image, r.replace(seed=2), 0.1).adu)
    quiet = r.replace(noise=False, readout=0.0, flicker=0.0, adc=0.0, bits=32)
    np.testing.assert_allclose(respond(image, quiet, 0.1).counts[1], blur(image[1], "gauss", 1.5), rtol=1e-12)


@pytest.mark.parametrize("kwargs,needle", [
    ({"psf": "airy", "psf_fwhm": 10.0}, "psf"),
    ({"psf": "gauss"}, "psf_fwhm"),
    ({"bits": 8}, "bits"),
    ({"readout": -1.0}, "readout"),
    ({"gain": 0.0}, "gain"),
    ({"psf_radius": -3}, "psf_radius"),
    ({"seed": 1.5}, "seed"),
    ({"seed": -1}, "seed"),
    ({"calibration_seed": -5}, "calibration_seed"),
])
def test_response_errors_name_the_field(kwargs, needle):
    with pytest.raises(ParameterError, match=needle):
        nbragg.Response(**kwargs)


def test_simulate_with_a_response_returns_detected_pixels():
    exp = nbragg.Experiment.from_nanobragg_args(
        "-cell 100 100 100 90 90 90 -default_F 100 -N 5 -lambda 1 -distance 100 -detpixels 32", warn=lambda m: None)
    plain = nbragg.simulate(exp)
    assert plain.detected is None
    res = nbragg.simulate(exp.replace(response=nbragg.Response(psf="gauss", psf_fwhm=100.0, readout=1.0)))
    np.testing.assert_array_equal(res.image, plain.image)
    assert res.detected.adu.shape == (32, 32) and res.detected.adu.dtype == np.uint16
    assert res.detected.counts.sum() == pytest.approx(plain.image.sum(), rel=0.05)
    with pytest.raises(ParameterError, match="response"):
        nbragg.Experiment(response="noisy")


def test_images_beyond_the_sampler_are_refused():
    with pytest.raises(ParameterError, match="Response.scale"):
        respond(np.ones((4, 4)), nbragg.Response(scale=1e30), 0.1)
    with pytest.raises(ParameterError, match="not finite"):
        respond(np.array([[np.nan]]), nbragg.Response(), 0.1)
