"""nanoBragg command-line semantics that change images, and the warnings nbragg adds."""


import numpy as np
import pytest

from conftest import GOLDEN

import nbragg
from nbragg.engine import build_model
from nbragg.nbargs import parse_nanobragg_args
from nbragg.report import resolved_settings

BASE = "-cell 70 80 90 75 85 95 -misset 10 5 3 -default_F 100 -N 5 -lambda 1.0 -distance 100 -pixel 0.4 -detpixels 12".split()


def parse(extra, base=BASE, cwd=None):
    msgs = []
    p = parse_nanobragg_args(base + extra, warn=msgs.append, cwd=cwd)
    return p, msgs


def settings(extra, base=BASE, cwd=None):
    p, msgs = parse(extra, base, cwd)
    return resolved_settings(build_model(p.experiment, warn=msgs.append)), msgs


def image(extra, base=BASE, cwd=None):
    p, _ = parse(extra, base, cwd)
    return nbragg.simulate(p.experiment, warn=lambda m: None).image


def test_unknown_flag_is_named_in_a_warning():
    _, msgs = parse(["-frobnicate", "3"])
    assert any("-frobnicate" in m and "unknown" in m and "did you mean" not in m for m in msgs)


@pytest.mark.parametrize("extra, says", [
    (["-energy", "12.4"], "-energy 12.4 is in eV: a wavelength of 999.873 A; for keV give -energy 12400"),
    (["-mosaic", "-1"], "-mosaic -1: a negative spread means unset"),
    (["-osc", "1", "-phisteps", "0"], "-phisteps 0 with -osc 1: nanoBragg.c takes 1 phi step"),
])
def test_likely_slips_are_warned(extra, says):
    _, msgs = parse(extra)
    assert any(says in m for m in msgs), msgs


@pytest.mark.parametrize("extra", [["-energy", "12400"], ["-mosaic", "0.5"], ["-osc", "1", "-phisteps", "2"]])
def test_intended_values_are_not_warned(extra):
    _, msgs = parse(extra)
    assert not any(w in m for m in msgs for w in ("is in eV", "means unset", "takes 1 phi step")), msgs


def test_unit_slip_oversampling_is_refused_unless_explicit():
    slip = BASE + ["-N", "10", "-lambda", "1", "-pixel", "100"]     # 100 mm pixels: meant microns
    p, _ = parse([], slip)
    with pytest.raises(nbragg.ParameterError, match=r"automatic oversampling of \d+ .* more than 100: check the "
                                                    r"units of the pixel size \(-pixel"):
        nbragg.simulate(p.experiment, warn=lambda m: None)
    p, _ = parse(["-oversample", "2"], slip)
    assert nbragg.simulate(p.experiment, warn=lambda m: None).model.oversample == 2


@pytest.mark.parametrize("typo, meant", [("-detpixel", "-detpixels"), ("-distanc", "-distance"),
                                         ("-lamda", "-lambda"), ("-thread", "-threads")])
def test_a_mistyped_flag_gets_a_suggestion(typo, meant):
    _, msgs = parse([typo, "64"])
    assert any(f"unknown flag {typo} ignored; did you mean {meant}?" in m for m in msgs), msgs


@pytest.mark.parametrize("flag", [["-pix0_vector", "0.1", "0", "0"], ["-coherent"], ["-density", "1.2"],
                                  ["-MW", "20000"]])
def test_flags_without_effect_are_reported(flag):
    _, msgs = parse(flag)
    assert any(flag[0] in m and "no effect" in m for m in msgs)


def test_pix0_vector_only_switches_to_custom():
    s, _ = settings(["-pix0_vector", "0.1", "0.02", "0.03"])
    assert s["convention"] == "custom"
    s2, _ = settings(["-beam_vector", "1", "0", "0"])
    assert s["Fbeam_Sbeam_m"] == s2["Fbeam_Sbeam_m"]


def test_convention_forces_the_pivot():
    s, msgs = settings(["-pivot", "sample"])
    assert s["pivot"] == "beam"
    assert any("-pivot has no effect" in m for m in msgs)
    s, _ = settings(["-mosflm", "-twotheta", "5"])
    assert s["pivot"] == "beam"
    s, _ = settings(["-xds", "-distance", "100"])
    assert s["pivot"] == "sample"


def test_custom_pivot_is_the_last_pivoting_flag():
    custom = ["-fdet_vector", "0", "0", "1"]
    assert settings(custom + ["-close_distance", "90", "-distance", "100"])[0]["pivot"] == "beam"
    assert settings(custom + ["-distance", "100", "-close_distance", "90"])[0]["pivot"] == "sample"
    assert settings(custom + ["-Xbeam", "2", "-pivot", "sample"])[0]["pivot"] == "sample"


def test_custom_default_beam_centre_is_half_the_detector():
    s, _ = settings(["-fdet_vector", "0", "0", "1"])
    assert s["Xbeam_Ybeam_m"] == pytest.approx([12 * 0.4e-3 / 2] * 2)
    s, _ = settings([])
    assert s["Xbeam_Ybeam_m"] == pytest.approx([(12 * 0.4e-3 + 0.4e-3) / 2] * 2)


def test_twotheta_axis_also_sets_twotheta_as_in_nanobragg():
    a, msgs = settings(["-twotheta_axis", "4", "1", "0"])
    assert any("-twotheta_axis also acts as -twotheta" in m for m in msgs)
    b, _ = settings(["-twotheta_axis", "4", "1", "0", "-twotheta", "4", "-pivot", "sample"])
    assert a["pivot"] == "sample"
    assert a["fdet_vector"] == pytest.approx(b["fdet_vector"])
    assert a["Fclose_Sclose_m"] == pytest.approx(b["Fclose_Sclose_m"])


def test_misset_seed_also_acts_as_misset():
    p, msgs = parse(["-misset_seed", "5", "-N", "5"])
    assert any("-misset_seed also acts as -misset" in m for m in msgs)
    # nanoBragg reads "-misset 5 -N 5": 5 degrees, atof("-N") = 0, 5 degrees
    assert p.experiment.crystal.misset == pytest.approx((5.0, 0.0, 5.0))


def test_curved_det_is_ignored_as_last_argument():
    p, msgs = parse(["-curved_det"])
    assert not p.experiment.detector.curved
    assert any("-curved_det" in m for m in msgs)
    p, _ = parse(["-curved_det", "-nonoise"])
    assert p.experiment.detector.curved


def test_xbeam_does_not_move_an_xds_detector():
    a, msgs = settings(["-xds"])
    b, _ = settings(["-xds", "-Xbeam", "3", "-Ybeam", "4"])
    assert a["Fclose_Sclose_m"] == b["Fclose_Sclose_m"]
    assert b["Xbeam_Ybeam_m"] == pytest.approx([0.003, 0.004])
    assert any("SMV header" in m for m in parse(["-xds", "-Xbeam", "3"])[1])


def test_n0_is_one_cell_but_selects_interpolation():
    assert np.array_equal(image(["-N", "0"]), image(["-N", "1"]))
    s, _ = settings(["-hkl", "tri.hkl", "-N", "0"], cwd=str(GOLDEN / "interpolate_N2"))
    assert s["interpolation"] == "auto-on" and s["cells"] == "1x1x1"


def test_mat_cancels_lambda():
    d = str(GOLDEN / "mat_hkl_nearest_nonsquare_mask")
    base = "-mat A.mat -default_F 100 -N 3 -distance 100 -pixel 0.5 -detpixels 10".split()
    assert np.allclose(image(["-lambda", "6.2"], base, d), image(["-lambda", "3.1"], base, d), rtol=1e-12, atol=0)


def test_sourcefile_weights_are_ignored(tmp_path):
    (tmp_path / "a.txt").write_text("-10 0 0 1 1e-10\n-10 0.02 0 1 1.02e-10\n")
    (tmp_path / "b.txt").write_text("-10 0 0 5 1e-10\n-10 0.02 0 0.1 1.02e-10\n")
    a = image(["-sourcefile", "a.txt"], cwd=str(tmp_path))
    b = image(["-sourcefile", "b.txt"], cwd=str(tmp_path))
    assert np.array_equal(a, b)


def test_detector_thick_alone_gives_two_layers_of_half_thickness():
    p, _ = parse(["-detector_thick", "300"])
    m = build_model(p.experiment, warn=lambda m: None)
    assert m.detector.thicksteps == 2
    assert m.detector.thickstep == pytest.approx(150e-6)
    p, _ = parse(["-detector_thick", "300", "-detector_thicksteps", "4"])
    assert build_model(p.experiment, warn=lambda m: None).detector.thickstep == pytest.approx(100e-6)


def test_water_background_is_divided_by_steps():
    # structure factors so small that only the water is left
    base = "-cell 100 100 100 90 90 90 -default_F 1e-20 -N 1 -lambda 1 -distance 100 -pixel 0.4 -detpixels 6 -nopolar -point_pixel".split()
    one = image(["-water", "10", "-oversample", "1"], base)
    two = image(["-water", "10", "-oversample", "2"], base)
    p, _ = parse(["-water", "10", "-oversample", "2"], base)
    m = build_model(p.experiment)
    R = np.linalg.norm(m.detector.pix0 + m.detector.pixel / 4 * (m.detector.fdet + m.detector.sdet))
    expect = 7.94079248018965e-30 * m.fluence * m.I_bg / m.steps / R ** 2
    assert two[0, 0] == pytest.approx(expect, rel=1e-12)
    assert one[0, 0] / two[0, 0] == pytest.approx(4.0 * (R / np.linalg.norm(
        m.detector.pix0 + m.detector.pixel / 2 * (m.detector.fdet + m.detector.sdet))) ** 2, rel=1e-9)


def test_dmin_zeroes_whole_pixels_even_with_water():
    img = image(["-dmin", "40", "-water", "10"])
    cut = image(["-dmin", "40"]) == 0
    assert cut.any() and (~cut).any()
    assert np.all(img[cut] == 0)


def test_oversample_thick_without_sensor_gives_zero_like_nanobragg():
    p, msgs = parse(["-oversample_thick"])
    img = nbragg.simulate(p.experiment, warn=msgs.append).image
    assert np.all(img == 0)
    assert any("capture fraction of 0" in m for m in msgs)


@pytest.mark.slow
def test_mask_header_beam_centre_y_counts_from_the_far_edge(tmp_path):
    from nbragg.io.smv import write_smv
    fields = dict(fpixels=12, spixels=10, pixel_m=4e-4, distance_m=0.1, wavelength_m=1e-10, Xbeam=0.002,
                  Ybeam=0.001, Fbeam=0.002, Sbeam=0.001, detsize_s=0.004, dials_origin=[0, 0, 0], ORGX=1, ORGY=1,
                  close_distance_m=0.1, phi0_deg=0, osc_deg=0, twotheta_deg=0)
    data = np.ones((10, 12), dtype=np.uint16)
    data[0, 0] = 0
    write_smv(tmp_path / "m.img", data, fields)
    base = "-cell 70 80 90 75 85 95 -default_F 100 -N 5".split()
    p, _ = parse(["-mask", "m.img", "-mosflm"], base, cwd=str(tmp_path))
    d = p.experiment.detector
    assert (d.fpixels, d.spixels, d.pixel_size) == (12, 10, 0.4)
    assert d.beam_x == pytest.approx(2.0)
    assert d.beam_y == pytest.approx(4.0 - 1.0)       # detsize_s - BEAM_CENTER_Y
    p2, _ = parse(["-img", "m.img"], base, cwd=str(tmp_path))
    assert p2.experiment.detector.beam_y == pytest.approx(1.0)
    p3, _ = parse(["-img", "m.img", "-Ybeam", "2.5", "-distance", "80"], base, cwd=str(tmp_path))
    assert p3.experiment.detector.beam_y == pytest.approx(2.5)
    assert p3.experiment.detector.distance == pytest.approx(80.0)
    img = nbragg.simulate(p.experiment, warn=lambda m: None).image
    assert img[0, 0] == 0 and img[0, 1] > 0


def test_phi_zero_step_uses_phi_zero_orientation():
    # nanoBragg.c keeps a stale orientation here; nbragg is deterministic
    a = image(["-phi", "0", "-osc", "2", "-phisteps", "2"])
    p, _ = parse(["-phi", "0", "-osc", "2", "-phisteps", "2"])
    m = build_model(p.experiment)
    assert np.allclose(m.crystal.orientations[0], m.crystal.real0)
    assert a.max() > 0


def test_round_crystal_at_the_direct_beam_is_not_zeroed_like_nanobragg():
    # nanoBragg.c evaluates the sphere transform 3 (sin x / x - cos x) / x^2 as written; at the
    # pixel centred on the direct beam rounding leaves a tiny x > 0, where that formula gives
    # exactly 0 (so the C's pixel is 0); nbragg's series gives about 1 (a README difference)
    import math
    from nbragg.kernels.physics import sinc3
    from nbragg.trace import trace_pixel
    p, _ = parse("-detpixels 81 -cell 100 100 100 90 90 90 -default_F 100 -round_xtal".split(), base=[])
    result = nbragg.simulate(p.experiment, warn=lambda m: None)
    m = result.model
    assert (m.oversample, len(m.sources.wavelengths), m.crystal.orientations.shape[0]) == (1, 1, 1)
    assert (m.crystal.Na, m.crystal.Nb, m.crystal.Nc, m.crystal.fudge) == (1.0, 1.0, 1.0, 1.0)
    _, _, _, _, samples, _ = trace_pixel(m, 41, 41)
    (h, k, l), hkl0 = samples[0]["hkl"], samples[0]["hkl0"]
    assert hkl0 == (0, 0, 0)
    x = math.pi * math.sqrt(h * h + k * k + l * l)       # the C's argument for this pixel
    assert 0.0 < x < 1e-8
    assert 3.0 * (np.sin(x) / x - np.cos(x)) / (x * x) == 0.0      # the C's formula
    assert sinc3(x) == pytest.approx(1.0, abs=1e-15)                # nbragg's
    assert samples[0]["F_latt"] == pytest.approx(0.723601254558268, rel=1e-15)
    img = result.image
    assert np.unravel_index(img.argmax(), img.shape) == (41, 41)
    assert img[41, 41] == pytest.approx(0.0052359877, rel=1e-7)


def test_random_misset_is_reproducible_and_printed():
    p1, _ = parse(["-misset", "random", "-misset_seed", "7"], base=BASE[:7] + BASE[10:])
    p2, _ = parse(["-misset", "random", "-misset_seed", "7"], base=BASE[:7] + BASE[10:])
    assert p1.experiment.crystal.misset == p2.experiment.crystal.misset
    assert any("random orientation misset angles" in n for n in p1.notes)
