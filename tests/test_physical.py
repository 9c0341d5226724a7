"""The physical mode (Experiment.physics = "physical", -physical): every sample's own
solid angle, polarization and sensor absorption multiply its terms, sensor layers divide
the thickness, water is an amorphous term scaled once, source weights count.  Checked
against tests/reference.py, against nanoBragg's mode where the two must agree, and
against closed forms: the solid angle of a flat rectangle, the absorption
1 - exp(-mu t / cos), and Darwin's integrated intensity of a reflection."""

import importlib.util
import math

import numpy as np
import pytest

from derivative_checks import assert_cuda_equals_cpu, assert_derivatives, assert_matches_reference

import nbragg
from nbragg.engine import build_model
from nbragg.errors import ParameterError
from nbragg.units import AVOGADRO, R_E_SQR, WATER_F, WATER_MW

QUIET = dict(warn=lambda m: None)
ARGS = ("-cell 40 50 60 80 90 100 -default_F 100 -N 6 -distance 60 -detpixels 20 -pixel 0.4 -lambda 1.0 "
        "-misset 10 5 3 -oversample 1 -polar 0.4")


def _exp(extra="", physics="physical", args=ARGS):
    exp = nbragg.Experiment.from_nanobragg_args((args + " " + extra).split(), **QUIET)
    return exp.replace(physics=physics)


def _image(exp, **kw):
    return nbragg.simulate(exp, **QUIET, **kw).image


def test_one_sample_per_pixel_is_nanobraggs_image():
    """With one sub-pixel, one source and no sensor or water, the two modes agree."""
    a = _image(_exp(physics="physical"))
    b = _image(_exp(physics="nanobragg"))
    assert a.max() > 0
    assert np.abs(a - b).max() <= 1e-13 * b.max()


@pytest.mark.parametrize("extra", [
    "-oversample 3",
    "-oversample 2 -detector_thick 300 -detector_abs 200 -detector_thicksteps 3",
    "-water 0.5 -dispersion 3 -dispsteps 3 -round_xtal",
    "-oversample 2 -nopolar -mosaic 0.4 -mosaic_dom 3 -gauss_xtal",
])
def test_physical_mode_against_the_reference(extra):
    exp = _exp(extra)
    image = assert_matches_reference(exp)
    # and it is not nanoBragg's image
    assert np.abs(image - _image(exp.replace(physics="nanobragg"))).max() > 1e-6 * image.max()


def _water_only(extra, physics="physical"):
    """A millimetre of water and no crystal's spots (the command line wants some F: set it to 0 after)."""
    exp = _exp("-water 1000 -nopolar " + extra, physics)
    return exp.replace(structure=exp.structure.replace(default_F=0.0))


def _pixel_centres(model):
    det = model.panels[0]
    f, s = np.meshgrid(np.arange(det.fpixels) + 0.5, np.arange(det.spixels) + 0.5)
    P = det.pix0 + (f[..., None] * det.fdet + s[..., None] * det.sdet) * det.pixel
    return P / np.linalg.norm(P, axis=-1)[..., None], det


def test_solid_angle_of_a_large_flat_detector():
    """Water alone, no polarization or sensor: the image summed is r_e^2 fluence F^2
    molecules times the detector's solid angle, which for a rectangle centred on the beam
    at distance D, half sides X and Y, is 4 atan(X Y / (D sqrt(X^2 + Y^2 + D^2)))."""
    exp = _water_only("-detpixels 100 -pixel 0.8 -distance 25 -oversample 4")
    image = _image(exp)
    molecules = (1000e-6) ** 3 * 1e6 * AVOGADRO / WATER_MW
    omega = image.sum() / (R_E_SQR * exp.beam.fluence * WATER_F ** 2 * molecules)
    X = Y = 40.0
    D = 25.0
    analytic = 4 * math.atan(X * Y / (D * math.sqrt(X * X + Y * Y + D * D)))
    assert abs(omega / analytic - 1) < 1e-3, (omega, analytic)
    # nanoBragg's mode does not give it: its water starts each pixel's sum once and is then
    # divided by the pixel's 16 samples (and scaled by r_e^2 fluence a second time)
    nb = _image(exp.replace(physics="nanobragg")).sum() / (R_E_SQR * exp.beam.fluence)
    assert nb / image.sum() == pytest.approx(1 / 16, rel=1e-2)


@pytest.mark.parametrize("layers, distance, tolerance", [(1, 30, 1e-12), (4, 600, 1e-3)])
def test_sensor_absorption_against_the_closed_form(layers, distance, tolerance):
    """The fraction of photons a sensor of thickness t and attenuation mu captures is
    1 - exp(-mu t / cos(theta)), theta from the sensor's normal; checked at every pixel of
    a detector spanning 0-45 degrees.  One layer: exact.  Several: each layer is a voxel
    seen from the sample, whose direction and solid angle change with its depth (parallax),
    by about depth / distance."""
    base = f"-detpixels 40 -pixel {distance / 20} -distance {distance} -Xbeam 0 -Ybeam 0 -oversample 1"
    sensor = f" -detector_thick 450 -detector_abs 320 -detector_thicksteps {layers}"
    bare = _image(_water_only(base))
    with_sensor = _image(_water_only(base + sensor))
    d, det = _pixel_centres(build_model(_water_only(base), **QUIET))
    cos = d @ det.odet
    mu_t = 450.0 / 320.0
    expected = 1 - np.exp(-mu_t / cos)
    assert cos.min() < 0.75 and cos.max() > 0.99
    np.testing.assert_allclose(with_sensor / bare, expected, rtol=tolerance)


def test_darwin_integrated_intensity_of_a_rocked_reflection():
    """A 5x5x5-cell cubic Gaussian domain rotated through reflection (4 0 0): the photons
    summed over its spot equal the kinematic integrated intensity

        E = (fluence / rotation) r_e^2 lambda^3 |F|^2 N_cells / (V_cell sin 2 theta)

    (unpolarized, rotation axis normal to the beam and to g).  The domain's fudge 0.315 pi
    makes its lattice factor squared integrate to exactly det N over reciprocal space."""
    a, lam, F, N = 40.0, 1.0, 100.0, 5
    g = 4 / a                                          # 1/A
    cos_phi = -lam * g / 2                             # g . k0 = -|g|^2 / 2 (|k0| = 1/lam)
    phi_bragg = math.degrees(math.acos(cos_phi))
    osc = 14.0
    exp = nbragg.Experiment.from_nanobragg_args(
        (f"-cell {a} {a} {a} 90 90 90 -default_F {F} -N {N} -gauss_domain -fudge {0.315 * math.pi!r} "
         f"-lambda {lam} -distance 100 -pixel 0.1 -detpixels 260 -oversample 2 -nopolar -fluence 1e24 "
         f"-phi {phi_bragg - osc / 2} -osc {osc} -phisteps 140").split(), **QUIET).replace(physics="physical")
    # the spot: the diffracted beam k0 + g at the Bragg angle, on the detector
    model = build_model(exp, **QUIET)
    det = model.panels[0]
    two_theta = 2 * math.asin(lam * g / 2)
    k = np.array([math.cos(two_theta), math.sin(two_theta), 0.0])
    hit = k * det.close_distance / (k @ det.odet) - det.pix0
    f0, s0 = int(hit @ det.fdet / det.pixel), int(hit @ det.sdet / det.pixel)
    # (3 0 0) and (5 0 0), and (4 0 +-1), cross the sphere in the same turn 25 pixels away:
    # the spot's own pixels are +-12 around it (6 sigma)
    roi = (f0 - 12, f0 + 12, s0 - 12, s0 + 12)
    assert 0 <= roi[0] and roi[1] < 260 and 0 <= roi[2] and roi[3] < 260
    exp = exp.replace(detector=exp.detector.replace(roi=roi))
    photons = _image(exp).sum()
    V = (a * 1e-10) ** 3
    expected = (exp.beam.fluence / math.radians(osc)) * R_E_SQR * (lam * 1e-10) ** 3 * F ** 2 * N ** 3 / (
        V * math.sin(two_theta))
    assert abs(photons / expected - 1) < 1e-3, (photons, expected)


def test_source_file_weights_count():
    import tempfile
    import os
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "src.txt")
        with open(path, "w") as fh:
            fh.write("-10 0 0 1 1e-10\n-10 0 0 3 1.04e-10\n")
        physical = _exp(f"-sourcefile {path}")
        flagged = _exp(f"-sourcefile {path} -source_weights", physics="nanobragg")
        plain = _exp(f"-sourcefile {path}", physics="nanobragg")
    a, b, c = _image(physical), _image(flagged), _image(plain)
    # nonBragg's weights count as given; the physical mode's share the fluence (mean 1)
    assert np.abs(a - b * 2 / 4).max() <= 1e-13 * a.max()
    assert np.abs(a - c).max() > 1e-3 * a.max()


def test_water_is_scaled_once():
    """nanoBragg multiplies its water background by r_e^2 fluence twice; the physical mode
    once: with one sample per pixel the two differ by exactly that factor."""
    exp = _water_only("")
    a = _image(exp)
    b = _image(exp.replace(physics="nanobragg"))
    np.testing.assert_allclose(b, a * R_E_SQR * exp.beam.fluence, rtol=1e-12)


@pytest.mark.parametrize("extra", ["-oversample 2 -water 0.02 -detector_thick 300 -detector_abs 200 "
                                   "-detector_thicksteps 2",
                                   "-oversample 2 -dispersion 2 -dispsteps 2 -round_xtal -mosaic 0.3 -mosaic_dom 2"])
def test_physical_gradients_match_central_differences(extra):
    exp = _exp(extra)
    names = ["distance", "wavelength", "misset_x", "cell_b", "Na", "polar", "beam_x", "detector_rotx"]
    if "-water" in extra:
        names.append("water")
    if "-mosaic" in extra:
        names.append("mosaic_spread")
    assert_derivatives(exp, names, seed=9)


def test_command_line_and_errors(tmp_path):
    from nbragg.nbargs import parse_nanobragg_args
    exp = parse_nanobragg_args((ARGS + " -physical").split(), **QUIET).experiment
    assert exp.physics == "physical"
    with pytest.raises(ParameterError, match="physics"):
        nbragg.Experiment(physics="real")


@pytest.mark.skipif(importlib.util.find_spec("numba_cuda") is None, reason="numba-cuda is not installed")
@pytest.mark.filterwarnings("ignore:overflow encountered in scalar add:RuntimeWarning")
def test_cuda_equals_cpu_in_the_physical_mode():
    exp = _exp("-oversample 2 -water 0.3 -detector_thick 300 -detector_abs 200 -detector_thicksteps 2 -round_xtal",
               args=ARGS.replace("-detpixels 20", "-detpixels 4"))
    assert_cuda_equals_cpu(exp, ["distance", "water", "polar"], jacobian=False)
