"""Weighted spectra (Beam.spectrum, spectrum_shift/scale/weights, SASE-like spectra) and
anisotropic mosaicity (Crystal.mosaic_eta, eta_a/b/c): both are set-up terms, so the checks
are of the set-up against independent numpy (the sources, the domain rotations), of the
kernels against tests/reference.py, of the derivatives against central differences, and of
the CUDA simulator against the CPU."""

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from derivative_checks import assert_cuda_equals_cpu, assert_derivatives, assert_matches_reference
from reference import reference_image

import nbragg
from nbragg.engine import build_model
from nbragg.errors import ParameterError
from nbragg.params import get_params, set_params

ARGS = ("-cell 40 50 60 90 90 90 -default_F 100 -N 6 -distance 60 -detpixels 24 -pixel 0.4 -lambda 1.0 "
        "-misset 10 5 3 -oversample 1")
QUIET = dict(warn=lambda m: None)


def _exp(extra=""):
    return nbragg.Experiment.from_nanobragg_args((ARGS + " " + extra).split(), **QUIET)


def _with_spectrum(exp, lam, w, **kw):
    return exp.replace(beam=exp.beam.replace(spectrum=(lam, w), **kw))


def _with_eta(exp, eta, domains=6, **kw):
    return exp.replace(crystal=exp.crystal.replace(mosaic_eta=eta, mosaic_domains=domains, **kw))


def _image(exp, **kw):
    return nbragg.simulate(exp, **QUIET, **kw).image


# ----------------------------------------------------------------------------- spectra

def test_two_line_spectrum_is_the_weighted_sum_of_two_images():
    exp = _exp("-gauss_xtal")
    two = _with_spectrum(exp, [1.0, 1.04], [1.0, 3.0])
    assert two.beam.wavelength == pytest.approx(1.03)
    one = _image(exp.replace(beam=exp.beam.replace(wavelength=1.0)))
    other = _image(exp.replace(beam=exp.beam.replace(wavelength=1.04)))
    both = _image(two)
    expected = 0.25 * one + 0.75 * other
    assert both.max() > 0 and one.max() > 0 and other.max() > 0
    assert np.abs(both - expected).max() <= 1e-12 * np.abs(expected).max()


def test_spectrum_sources_and_kernel_against_the_reference():
    lam = np.array([0.98, 1.0, 1.03])
    w = np.array([2.0, 5.0, 1.0])
    exp = _with_spectrum(_exp("-divergence 0.5 -divsteps 2 -square_div"), lam, w, spectrum_shift=0.01,
                         spectrum_scale=1.5)
    model = build_model(exp, **QUIET)
    mean = np.sum(lam * w) / np.sum(w)
    expected_lam = (mean + 1.5 * (lam - mean) + 0.01) * 1e-10
    ndiv = 4
    np.testing.assert_allclose(model.sources.wavelengths, np.tile(expected_lam, ndiv), rtol=1e-15)
    np.testing.assert_allclose(model.scene.beam.weights, np.tile(3 * w / w.sum(), ndiv), rtol=1e-15)
    image = _image(exp)
    ref = reference_image(model)
    assert image.max() > 0
    assert np.abs(image - ref).max() <= 1e-12 * ref.max()


def test_shift_and_scale_change_nothing_at_their_defaults():
    exp = _exp("-dispersion 2 -dispsteps 3")
    same = exp.replace(beam=exp.beam.replace(spectrum_shift=0.0, spectrum_scale=1.0))
    assert np.array_equal(_image(exp), _image(same))


@pytest.mark.parametrize("extra", ["-gauss_xtal", "-oversample 2 -round_xtal"])
def test_spectrum_gradients_match_central_differences(extra):
    exp = _with_spectrum(_exp(extra), [0.99, 1.0, 1.02], [1.0, 3.0, 2.0], spectrum_shift=0.003,
                         spectrum_scale=1.2)
    check = nbragg.check_gradients(exp, ["spectrum_shift", "spectrum_scale", "spectrum_weights"])
    assert len(check.rows) == 5
    assert check.max_error < 1e-6, check.table()


def test_spectrum_weights_gradient_is_orthogonal_to_the_weights():
    exp = _with_spectrum(_exp("-gauss_xtal"), [0.99, 1.0, 1.02], [1.0, 3.0, 2.0])
    u = np.random.default_rng(1).uniform(0.5, 1.5, (24, 24))
    g = nbragg.gradient(exp, ["spectrum_weights"], u)["spectrum_weights"]
    assert np.abs(g).max() > 0
    assert abs(g @ np.array([1.0, 3.0, 2.0])) <= 1e-10 * np.abs(g).max()


def test_spectrum_jacobian_agrees_with_gradient():
    exp = _with_spectrum(_exp("-gauss_xtal"), [0.99, 1.02], [1.0, 2.0])
    names = ["spectrum_shift", "spectrum_scale"]
    J = nbragg.jacobian(exp, names)
    u = np.random.default_rng(2).uniform(0.5, 1.5, (24, 24))
    g = nbragg.gradient(exp, names, u)
    for p, n in enumerate(names):
        assert J[:, p] @ u.ravel() == pytest.approx(g[n], rel=1e-11)


def test_spectrum_parameters_round_trip_and_refuse_wavelength():
    exp = _with_spectrum(_exp(), [0.99, 1.02], [1.0, 2.0])
    p = get_params(exp, ["spectrum_shift", "spectrum_scale", "spectrum_weights"])
    assert p["spectrum_shift"] == 0.0 and p["spectrum_scale"] == 1.0
    np.testing.assert_array_equal(p["spectrum_weights"], [1.0, 2.0])
    e2 = set_params(exp, {"spectrum_weights": [2.0, 1.0], "spectrum_shift": 0.01})
    assert e2.beam.wavelength == pytest.approx((0.99 * 2 + 1.02) / 3)
    assert get_params(e2, ["spectrum_shift"])["spectrum_shift"] == 0.01
    with pytest.raises(ParameterError, match="spectrum_shift"):
        get_params(exp, ["wavelength"])
    with pytest.raises(ParameterError, match="shape"):
        set_params(exp, {"spectrum_weights": [1.0, 2.0, 3.0]})
    with pytest.raises(ParameterError, match="no spectrum"):
        get_params(_exp(), ["spectrum_weights"])


@pytest.mark.parametrize("kw, match", [
    (dict(spectrum=([1.0, 1.1], [1.0])), "same length"),
    (dict(spectrum=([1.0, -1.1], [1.0, 1.0])), "channel 1 has wavelength"),
    (dict(spectrum=([1.0, 1.1], [1.0, -2.0])), "channel 1 has weight"),
    (dict(spectrum=([1.0, 1.1], [0.0, 0.0])), "every weight is 0"),
    (dict(spectrum=([1.0], [1.0]), dispersion=1.0, disp_steps=3), "replaces the dispersion"),
    (dict(spectrum=([1.0], [1.0]), sources=np.array([[0, 0, 1, 1, 1e-10]])), "both given"),
    (dict(spectrum_scale=0.0), "spectrum_scale"),
])
def test_bad_spectra_are_named(kw, match):
    with pytest.raises(ParameterError, match=match):
        nbragg.Beam(**kw)


def test_spectrum_file_on_the_command_line(tmp_path):
    f = tmp_path / "spec.txt"
    f.write_text("# lambda weight\n1.0 1\n1.04, 3\n")
    from nbragg.nbargs import parse_nanobragg_args
    exp = parse_nanobragg_args((ARGS + f" -gauss_xtal -spectrum {f}").split(), **QUIET).experiment
    np.testing.assert_array_equal(exp.beam.spectrum[0], [1.0, 1.04])
    assert np.array_equal(_image(exp), _image(_with_spectrum(_exp("-gauss_xtal"), [1.0, 1.04], [1, 3])))
    bad = tmp_path / "bad.txt"
    bad.write_text("1.0 1\n1.04 x\n")
    r = subprocess.run([sys.executable, "-m", "nbragg", *ARGS.split(), "-spectrum", str(bad), "-floatfile",
                        str(tmp_path / "o.bin")], capture_output=True, text=True)
    assert r.returncode == 2
    assert "line 2" in r.stderr and "'x'" in r.stderr and "Traceback" not in r.stderr


def test_source_weights_flag_honours_the_file(tmp_path):
    f = tmp_path / "src.txt"
    f.write_text("-10 0 0 1 1e-10\n-10 0 0 3 1.04e-10\n")
    from nbragg.nbargs import parse_nanobragg_args
    plain = parse_nanobragg_args((ARGS + f" -gauss_xtal -sourcefile {f}").split(), **QUIET).experiment
    weighted = parse_nanobragg_args((ARGS + f" -gauss_xtal -sourcefile {f} -source_weights").split(),
                                    **QUIET).experiment
    assert weighted.beam.source_weights and not plain.beam.source_weights
    a, b = _image(weighted), _image(_with_spectrum(_exp("-gauss_xtal"), [1.0, 1.04], [1, 3]))
    # file weights 1 and 3 over 2 sources: twice the normalised spectrum's image
    assert np.abs(a - 2 * b).max() <= 1e-12 * a.max()


def test_sase_spectrum():
    lam, w = nbragg.sase_spectrum(wavelength=1.3, bandwidth=3e-3, spikes=12, channels=81, seed=7)
    lam2, w2 = nbragg.sase_spectrum(energy=12398.42 / 1.3, bandwidth=3e-3, spikes=12, channels=81, seed=7)
    np.testing.assert_allclose(lam, lam2, rtol=1e-14)
    np.testing.assert_allclose(w, w2, rtol=1e-12)
    assert lam.shape == w.shape == (81,)
    assert w.sum() == pytest.approx(1.0) and np.all(w >= 0)
    assert abs(np.sum(lam * w) - 1.3) < 3e-3 * 1.3
    other = nbragg.sase_spectrum(wavelength=1.3, bandwidth=3e-3, spikes=12, channels=81, seed=8)[1]
    assert not np.allclose(w, other)
    # spiky: well above the smooth envelope somewhere
    assert w.max() > 2.0 / 81
    with pytest.raises(ParameterError, match="spikes"):
        nbragg.sase_spectrum(wavelength=1.0, spikes=0)
    with pytest.raises(ParameterError, match="one of wavelength"):
        nbragg.sase_spectrum()


def test_dataset_draws_a_spectrum_per_frame(tmp_path):
    pytest.importorskip("h5py")
    from nbragg.dataset import frame_experiment, frame_parameters, generate, load_spec
    import h5py
    spec = load_spec({"seed": 3, "images": 3, "base": ARGS + " -gauss_xtal",
                      "vary": {"wavelength": {"uniform": [0.98, 1.02]}},
                      "spectrum": {"sase": {"bandwidth": 0.01, "spikes": 5, "channels": 9}}})
    out = generate(spec, str(tmp_path / "ds.h5"), workers=0, progress=False)
    with h5py.File(out, "r") as fh:
        spectra = fh["entry/nbragg/spectrum"][()]
        wl = fh["entry/nbragg/wavelength"][()]
    assert spectra.shape == (3, 9, 2)
    assert not np.allclose(spectra[0, :, 1], spectra[1, :, 1])
    from nbragg.dataset.frames import base_experiment
    base = base_experiment(spec)
    for i in range(3):
        exp = frame_experiment(base, *frame_parameters(spec, base, i), spec, i)
        np.testing.assert_array_equal(np.column_stack(exp.beam.spectrum), spectra[i])
        assert abs(np.sum(spectra[i, :, 0] * spectra[i, :, 1]) - wl[i]) < 0.02
    with pytest.raises(nbragg.NbraggError, match="spectrum.sase.spikes"):
        load_spec({"images": 1, "base": ARGS, "spectrum": {"sase": {"spikes": 0}}})


# ----------------------------------------------------------------------------- mosaicity

def _rotvec_matrix(r):
    """exp([r]x) by the matrix exponential's series (independent of the set-up's Rodrigues)."""
    K = np.array([[0, -r[2], r[1]], [r[2], 0, -r[0]], [-r[1], r[0], 0]], dtype=float)
    out, term = np.eye(3), np.eye(3)
    for n in range(1, 30):
        term = term @ K / n
        out = out + term
    return out


def test_anisotropic_domains_against_an_independent_construction():
    eta = (0.4, 1.1, 0.25)
    exp = _with_eta(_exp("-gauss_xtal -phi 3 -osc 2 -phisteps 2"), eta, domains=7, mosaic_seed=11)
    model = build_model(exp, **QUIET)
    # the crystal at phi = 0 without mosaicity (the -phi 3 image's first orientation, turned back)
    plain = build_model(exp.replace(crystal=exp.crystal.replace(mosaic_eta=None, mosaic_domains=None)), **QUIET)
    real0 = (_rotvec_matrix(-np.asarray(plain.crystal.spindle) * np.radians(3.0))
             @ plain.crystal.orientations[0].T).T
    axes = real0 / np.linalg.norm(real0, axis=1)[:, None]
    z = np.random.default_rng(11).standard_normal((3, 3))
    z = np.linalg.solve(np.linalg.cholesky(z.T @ z), z.T).T * np.sqrt(7 / 2)      # whitened
    z = np.concatenate([z, -z, np.zeros((1, 3))])
    np.testing.assert_allclose(z.T @ z / 7, np.eye(3), atol=1e-14)
    spindle = np.asarray(model.crystal.spindle)
    orients = model.crystal.orientations
    assert orients.shape == (2 * 7, 3, 3)
    for p, phi in enumerate(np.radians([3.0, 4.0])):
        Rphi = _rotvec_matrix(spindle * phi)
        for m in range(7):
            U = _rotvec_matrix(np.radians(eta) @ (z[m][:, None] * axes))
            np.testing.assert_allclose(orients[p * 7 + m], (Rphi @ U @ real0.T).T, rtol=0, atol=1e-15 * 1e-9 * 60)
    image = _image(exp)
    ref = reference_image(model)
    assert image.max() > 0
    assert np.abs(image - ref).max() <= 1e-12 * ref.max()


@pytest.mark.parametrize("domains", [6, 9, 10])
def test_eta_is_the_rms_rotation_about_each_axis(domains):
    """For an orthogonal cell: over the domains, the rotation vector's component along axis
    k has rms eta_k, the components are uncorrelated, and the mean rotation is none."""
    eta = np.radians([0.2, 0.5, 0.3])
    exp = _with_eta(_exp(), tuple(np.degrees(eta)), domains=domains)
    from scipy.spatial.transform import Rotation
    o = build_model(exp, **QUIET).crystal.orientations
    base = build_model(_exp(), **QUIET).crystal.orientations[0]
    unit = base / np.linalg.norm(base, axis=1)[:, None]
    # o[m] = base R_m^T: each domain's rotation vector, on the crystal's axes
    r = np.array([Rotation.from_matrix(np.linalg.solve(base, o[m]).T).as_rotvec() for m in range(domains)])
    comp = r @ np.linalg.inv(unit)
    M = comp.T @ comp / domains
    np.testing.assert_allclose(np.sqrt(np.diag(M)), eta, rtol=1e-9)
    assert np.abs(M - np.diag(np.diag(M))).max() < 1e-12
    assert np.abs(comp.mean(axis=0)).max() < 1e-15


def test_rotation_about_one_axis_leaves_it_alone():
    exp = _with_eta(_exp(), (0.0, 0.8, 0.0), domains=10)
    o = build_model(exp, **QUIET).crystal.orientations
    np.testing.assert_allclose(o[:, 1, :], np.broadcast_to(o[0, 1], (10, 3)), rtol=0, atol=1e-24)
    assert np.ptp(o[:, 0, 0]) > 0


def test_anisotropic_mosaic_gradients_match_central_differences():
    exp = _with_eta(_exp("-gauss_xtal -N 10"), (0.3, 0.5, 0.2), domains=8)
    check = nbragg.check_gradients(exp, ["eta_a", "eta_c", "misset_x"])
    assert check.max_error < 1e-6, check.table()
    rot = _with_eta(_exp("-gauss_xtal -N 10 -osc 0.5 -phisteps 3"), (0.3, 0.5, 0.2), domains=6)
    check = nbragg.check_gradients(rot, ["eta_a", "eta_b"])
    assert check.max_error < 1e-6, check.table()


def test_mosaic_eta_parameters_and_errors():
    exp = _exp()
    assert get_params(exp, ["eta_a"])["eta_a"] == 0.0
    e2 = set_params(_with_eta(exp, (0.1, 0.2, 0.3)), {"eta_b": 0.5})
    assert e2.crystal.mosaic_eta == (0.1, 0.5, 0.3)
    with pytest.raises(ParameterError, match="both given"):
        nbragg.Crystal(mosaic_eta=(0.1, 0.1, 0.1), mosaic_spread=0.2)
    with pytest.raises(ParameterError, match="negative"):
        nbragg.Crystal(mosaic_eta=(0.1, -0.1, 0.1))
    with pytest.raises(ParameterError, match="at least 6"):
        nbragg.Crystal(mosaic_eta=(0.1, 0.1, 0.1), mosaic_domains=4)


def test_refinement_recovers_anisotropic_mosaicity():
    """A still with Poisson noise (about 100 spot pixels): eta_a, eta_b, eta_c refined
    from 20 % off come back within 3 reported standard uncertainties.  (The loss is sharply
    peaked: from 40 % off it can stop in a side minimum.  Over 20 noise realisations the
    rms of (refined - true) / uncertainty is 0.95, 1.35 and 0.86.)"""
    base = nbragg.Experiment.from_nanobragg_args(
        ("-cell 60 70 80 90 90 90 -default_F 100 -N 12 -distance 40 -detpixels 96 -pixel 0.3 -lambda 1.0 "
         "-misset 10 5 3 -oversample 1 -gauss_xtal -fluence 1e28").split(), **QUIET)
    eta = (0.25, 0.5, 0.35)
    truth = _with_eta(base, eta, domains=12)
    obs = np.random.default_rng(100).poisson(_image(truth)).astype(float)
    start = set_params(truth, {"eta_a": 0.2, "eta_b": 0.6, "eta_c": 0.28})
    fit = nbragg.refine(start, obs, ["eta_a", "eta_b", "eta_c"], loss="poisson")
    for n, v in zip(("eta_a", "eta_b", "eta_c"), eta):
        assert abs(fit.values[n] - v) <= 3 * fit.uncertainties[n], fit.table()
        assert fit.uncertainties[n] < 0.01 * v, fit.table()


@pytest.mark.skipif(importlib.util.find_spec("numba_cuda") is None, reason="numba-cuda is not installed")
@pytest.mark.filterwarnings("ignore:overflow encountered in scalar add:RuntimeWarning")
def test_cuda_equals_cpu_for_spectra_and_anisotropic_mosaic():
    exp = _with_eta(_with_spectrum(nbragg.Experiment.from_nanobragg_args(
        (ARGS.replace("-detpixels 24", "-detpixels 6") + " -gauss_xtal").split(), **QUIET),
        [0.99, 1.02], [1.0, 2.0], spectrum_shift=0.002), (0.3, 0.5, 0.2), domains=6)
    assert_cuda_equals_cpu(exp, ["spectrum_shift", "spectrum_scale", "spectrum_weights", "eta_a", "eta_b", "eta_c"],
                           jacobian=False)


# ----------------------------------------------------------------------------- domain shape

def _domain(extra="", **kw):
    exp = _exp("-gauss_domain -N 8 " + extra)
    sizes = dict(N_ab=1.5, N_ac=-1.0, N_bc=2.0)
    sizes.update(kw)
    return exp.replace(crystal=exp.crystal.replace(**sizes))


@pytest.mark.parametrize("extra", ["", "-oversample 2 -fudge 1.3", "-mosaic 0.3 -mosaic_dom 3"])
def test_gauss_domain_against_the_reference(extra):
    exp = _domain(extra)
    assert_matches_reference(exp)


def test_gauss_domain_peak_is_the_number_of_cells():
    """At a node the lattice factor is det N; without off-diagonal terms, Na Nb Nc."""
    from nbragg.kernels.physics import DOMAIN, lattice_factor
    xt = build_model(_domain(), **QUIET).scene.xtal
    assert xt.shape == DOMAIN
    N = np.array([[8, 1.5, -1.0], [1.5, 8, 2.0], [-1.0, 2.0, 8]])
    assert lattice_factor(3.0, -2.0, 5.0, 3, -2, 5, xt) == pytest.approx(np.linalg.det(N), rel=1e-14)
    plain = build_model(_domain(N_ab=0.0, N_ac=0.0, N_bc=0.0), **QUIET).scene.xtal
    assert lattice_factor(1.0, 1.0, 1.0, 1, 1, 1, plain) == 512.0


@pytest.mark.parametrize("extra", ["", "-oversample 2 -mosaic 0.3 -mosaic_dom 3"])
def test_gauss_domain_gradients_match_central_differences(extra):
    exp = _domain(extra)
    names = ["N_ab", "N_ac", "N_bc", "Na", "Nb", "Nc", "cell_b", "misset_x"]
    assert_derivatives(exp, names, seed=7, steps={n: 0.01 for n in names[:6]})


def test_gauss_domain_errors():
    with pytest.raises(ParameterError, match="gauss_domain"):
        nbragg.Crystal(N_ab=1.0)
    with pytest.raises(ParameterError, match="positive definite"):
        nbragg.Crystal(shape="gauss_domain", Na=2, Nb=2, Nc=2, N_ab=3.0)
    with pytest.raises(ParameterError, match="positive definite"):
        set_params(_domain(), {"N_bc": 9.0})


def test_refinement_recovers_a_domain_size_matrix():
    """A Poisson still of a Gaussian domain with off-diagonal sizes: Na Nb Nc N_ab N_ac N_bc
    refined from a start 20 % (diagonal) and 1 cell (off-diagonal) off come back within 3
    reported standard uncertainties."""
    base = nbragg.Experiment.from_nanobragg_args(
        ("-cell 60 70 80 90 90 90 -default_F 100 -distance 40 -detpixels 96 -pixel 0.3 -lambda 1.0 "
         "-misset 10 5 3 -oversample 1 -gauss_domain -fluence 1e28").split(), **QUIET)
    true = dict(Na=12.0, Nb=10.0, Nc=14.0, N_ab=2.0, N_ac=-1.5, N_bc=3.0)
    truth = base.replace(crystal=base.crystal.replace(**true))
    obs = np.random.default_rng(5).poisson(_image(truth)).astype(float)
    start = set_params(truth, dict(Na=14.4, Nb=8.0, Nc=11.2, N_ab=1.0, N_ac=-0.5, N_bc=2.0))
    fit = nbragg.refine(start, obs, list(true), loss="poisson")
    for n, v in true.items():
        assert abs(fit.values[n] - v) <= 3 * fit.uncertainties[n], fit.table()
        assert fit.uncertainties[n] < 0.05 * abs(v), fit.table()


@pytest.mark.skipif(importlib.util.find_spec("numba_cuda") is None, reason="numba-cuda is not installed")
@pytest.mark.filterwarnings("ignore:overflow encountered in scalar add:RuntimeWarning")
def test_cuda_equals_cpu_for_the_gauss_domain():
    exp = _domain().replace(detector=_domain().detector.replace(roi=(9, 14, 9, 14)))
    assert_cuda_equals_cpu(exp, ["N_ab", "N_ac", "N_bc", "Nb"])


# ----------------------------------------------------------------------------- B factor

def _with_B(exp, B):
    return exp.replace(structure=exp.structure.replace(B_iso=B))


def test_b_factor_is_the_debye_waller_factor_per_pixel():
    """One sample per pixel: the image with B is the image without it times
    exp(-2 B (sin(theta)/lambda)^2) at each pixel's centre (closed form, numpy)."""
    exp = _exp("-water 0")
    model = build_model(exp, **QUIET)
    plain = _image(exp)
    with_b = _image(_with_B(exp, 25.0))
    det = model.panels[0]
    f, s = np.meshgrid(np.arange(24) + 0.5, np.arange(24) + 0.5)
    P = det.pix0 + (f[..., None] * det.fdet + s[..., None] * det.sdet) * det.pixel
    d = P / np.linalg.norm(P, axis=-1)[..., None]
    two_theta = np.arccos(d @ -model.sources.directions[0])
    stol = np.sin(two_theta / 2) / 1.0      # 1/A, lambda = 1 A
    expected = plain * np.exp(-2 * 25.0 * stol ** 2)
    assert plain.max() > 0
    np.testing.assert_allclose(with_b, expected, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("extra", ["", "-round_xtal -oversample 2 -dispersion 2 -dispsteps 2",
                                   "-oversample 2 -oversample_omega -oversample_polar"])
def test_b_factor_against_the_reference(extra):
    exp = _with_B(_exp(extra), 18.0)
    assert_matches_reference(exp)


@pytest.mark.parametrize("extra", ["", "-round_xtal -oversample 2 -dispersion 2 -dispsteps 2",
                                   "-oversample 2 -oversample_omega -oversample_polar -water 0.05"])
@pytest.mark.parametrize("B", [0.0, 18.0])
def test_b_factor_gradients_match_central_differences(extra, B):
    exp = _with_B(_exp(extra), B)
    names = ["B_iso", "distance", "wavelength", "misset_x", "cell_b"]
    assert_derivatives(exp, names, seed=8, steps={"B_iso": 0.5})


def test_b_factor_spectrum_and_domain_together_in_float32():
    exp = _with_B(_with_spectrum(_domain(), [0.99, 1.02], [1.0, 2.0]), 15.0)
    a = _image(exp)
    b = _image(exp, precision="float32")
    assert a.max() > 0
    assert np.abs(a - b).max() <= 1e-4 * a.max()


@pytest.mark.skipif(importlib.util.find_spec("numba_cuda") is None, reason="numba-cuda is not installed")
@pytest.mark.filterwarnings("ignore:overflow encountered in scalar add:RuntimeWarning")
def test_cuda_equals_cpu_with_a_b_factor():
    small = _with_B(nbragg.Experiment.from_nanobragg_args(
        (ARGS.replace("-detpixels 24", "-detpixels 6") + " -round_xtal").split(), **QUIET), 20.0)
    assert_cuda_equals_cpu(small, ["B_iso", "distance", "wavelength"])


# ----------------------------------------------------------------------------- anisotropic U

U_ANISO = (0.30, 0.22, 0.40, 0.05, -0.04, 0.03)


def _with_U(exp, U=U_ANISO):
    return exp.replace(structure=exp.structure.replace(U_aniso=U))


def test_isotropic_u_is_the_b_factor():
    """U_ij = B / (8 pi^2) on the diagonal of an orthogonal cell is the B factor."""
    exp = _exp("-oversample 2 -mosaic 0.3 -mosaic_dom 3")
    u = 20.0 / (8 * np.pi ** 2)
    a = _image(_with_U(exp, (u, u, u, 0.0, 0.0, 0.0)))
    b = _image(_with_B(exp, 20.0))
    assert a.max() > 0 and np.abs(a - _image(exp)).max() > 1e-3 * a.max()
    assert np.abs(a - b).max() <= 1e-12 * b.max()


@pytest.mark.parametrize("extra", ["", "-oversample 2 -round_xtal -interpolate"])
def test_anisotropic_u_against_the_reference(extra):
    args = ARGS.replace("-cell 40 50 60 90 90 90", "-cell 40 50 60 80 95 105")
    exp = _with_U(nbragg.Experiment.from_nanobragg_args((args + " " + extra).split(), **QUIET))
    assert_matches_reference(exp)


@pytest.mark.parametrize("extra", ["", "-round_xtal -oversample 2"])
def test_anisotropic_u_gradients_match_central_differences(extra):
    exp = _with_U(_exp(extra))
    names = ["U_11", "U_22", "U_33", "U_12", "U_13", "U_23", "cell_b", "misset_x"]
    assert_derivatives(exp, names, seed=10, steps={n: 0.01 for n in names[:6]})


def test_anisotropic_u_parameters_and_errors():
    with pytest.raises(ParameterError, match="no anisotropic displacements"):
        get_params(_exp(), ["U_11"])
    exp = set_params(_with_U(_exp()), {"U_12": 0.01})
    assert exp.structure.U_aniso[3] == 0.01
    with pytest.raises(ParameterError, match="positive semi-definite"):
        nbragg.Structure(U_aniso=(0.1, 0.1, 0.1, 0.5, 0.0, 0.0))
    with pytest.raises(ParameterError, match="six"):
        nbragg.Structure(U_aniso=(0.1, 0.1))


@pytest.mark.skipif(importlib.util.find_spec("numba_cuda") is None, reason="numba-cuda is not installed")
@pytest.mark.filterwarnings("ignore:overflow encountered in scalar add:RuntimeWarning")
def test_cuda_equals_cpu_with_anisotropic_u():
    small = _with_U(nbragg.Experiment.from_nanobragg_args(
        (ARGS.replace("-detpixels 24", "-detpixels 6") + " -round_xtal").split(), **QUIET))
    assert_cuda_equals_cpu(small, ["U_11", "U_22", "U_33", "U_12", "U_13", "U_23", "cell_a"])


def test_sase_channels_integrate_the_modes():
    """Each channel holds its bin's share of the modes (Gaussians drawn by the seed),
    integrated numerically here; a mode narrower than a channel keeps its weight."""
    mean, bw, spikes, seed = 1.0, 3e-3, 20, 1
    lam, w = nbragg.sase_spectrum(wavelength=mean, bandwidth=bw, spikes=spikes, channels=41, seed=seed)
    rng = np.random.default_rng(seed)
    fwhm = bw * mean
    k = 2 * np.sqrt(2 * np.log(2))
    centres = rng.normal(mean, fwhm / k, spikes)
    heights = rng.exponential(1.0, spikes)
    width = fwhm / spikes / k
    step = lam[1] - lam[0]
    expected = []
    for x in lam:
        t = np.linspace(x - step / 2, x + step / 2, 4001)
        density = (heights[:, None] * np.exp(-0.5 * ((t[None, :] - centres[:, None]) / width) ** 2)).sum(axis=0)
        expected.append(np.sum((density[1:] + density[:-1]) / 2) * (t[1] - t[0]))
    expected = np.array(expected) / np.sum(expected)
    np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-9)
    assert nbragg.sase_spectrum(wavelength=1.0, channels=1)[1].tolist() == [1.0]


def test_refinement_rejects_a_step_to_a_domain_matrix_that_is_not_positive_definite():
    """A trial step that makes no experiment gives infinite residuals, which the trust
    region rejects (it shrinks and tries again), instead of stopping the fit."""
    from nbragg.refine import _Problem
    truth = _domain(N_ab=5.0, N_ac=0.0, N_bc=0.0)
    obs = _image(truth)
    problem = _Problem(truth, obs, ["N_ab"], "l2", np.ones(obs.shape, dtype=bool), None, 0.0, 0.0)
    assert np.all(np.isinf(problem.fun(np.array([9.0]))))        # |N_ab| > 8: not positive definite
    assert np.all(np.isfinite(problem.fun(np.array([5.0]))))
    fit = nbragg.refine(set_params(truth, {"N_ab": 7.6}), obs, ["N_ab"], loss="l2")
    assert fit.values["N_ab"] == pytest.approx(5.0, abs=1e-4)
