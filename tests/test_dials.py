"""DIALS experiment lists: real files from DIALS's public test data (tests/data/dials,
sources in its README) read as Experiments, checked against an independent composition
of the detector hierarchy (tests/dials_reference.py), against DIALS's own formulas for
the crystal's orientation and the Bragg condition, and written back."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

import dials_reference
import nbragg
from nbragg.engine import build_model
from nbragg.errors import InputFileError
from nbragg.io.dials import read_experiments, write_experiments

DATA = Path(__file__).parent / "data" / "dials"
FILES = ["cspad_single_image.expt", "cspad_multi_stills_regression.json", "i23_p12m_dials423.json",
         "kappa_pilatus6m_ag_imported.expt", "i19_lcys_11_integrated.expt", "insulin_adsc_refined.expt",
         "ssx_cunir_indexed.expt"]


def _doc(name):
    return json.loads((DATA / name).read_text())


def _rotation(axis, deg):
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    t = np.radians(deg)
    K = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * K + (1 - np.cos(t)) * K @ K


@pytest.mark.parametrize("name", FILES)
def test_panels_match_an_independent_composition(name):
    doc = _doc(name)
    reference = dials_reference.lab_panels(doc)
    for i, exp in enumerate(read_experiments(DATA / name)):
        ref = reference[doc["experiment"][i]["detector"]]
        panels = exp.detector.panels
        assert len(panels) == len(ref)
        for p, r in zip(panels, ref):
            np.testing.assert_allclose(p.origin, r["origin"], rtol=0, atol=1e-9)
            np.testing.assert_allclose(p.fast_axis, r["fast_axis"], rtol=0, atol=1e-12)
            np.testing.assert_allclose(p.slow_axis, r["slow_axis"], rtol=0, atol=1e-12)
            assert p.image_size == tuple(r["image_size"]) and p.pixel_size == tuple(r["pixel_size"])
        # and the kernel's panels are those, in metres
        model = build_model(exp.replace(crystal=exp.crystal.replace(Na=1, Nb=1, Nc=1),
                                        sampling=nbragg.Sampling(oversample=1)), warn=lambda m: None)
        for kp, p in zip(model.panels, panels):
            np.testing.assert_allclose(kp.pix0 * 1000, p.origin, rtol=0, atol=1e-9)


def test_beam_and_polarization():
    doc = _doc("i19_lcys_11_integrated.expt")
    b = doc["beam"][0]
    exp = read_experiments(DATA / "i19_lcys_11_integrated.expt")[0]
    assert exp.beam.wavelength == b["wavelength"]
    direction = np.array(b["direction"]) / np.linalg.norm(b["direction"])
    np.testing.assert_allclose(exp.detector.beam_vector, -direction, atol=1e-15)
    assert exp.beam.polarization == pytest.approx(2 * b["polarization_fraction"] - 1)
    # the electric vector is perpendicular to the polarization normal and to the beam
    E = np.asarray(exp.detector.polar_vector)
    assert abs(E @ b["polarization_normal"]) < 1e-12 and abs(E @ direction) < 1e-12


@pytest.mark.parametrize("name", ["i19_lcys_11_integrated.expt", "insulin_adsc_refined.expt",
                                  "i23_p12m_dials423.json"])
def test_rotation_setting_matches_dials(name):
    """nbragg's crystal at the start of the first image equals DIALS's S R(e, phi) F A^-1,
    with F, S and e built here from the goniometer as DIALS defines them."""
    doc = _doc(name)
    exp = read_experiments(DATA / name)[0]
    g, scan, cry = doc["goniometer"][0], doc["scan"][0], doc["crystal"][0]
    if "axes" in g:
        axes, angles, k = g["axes"], g["angles"], g["scan_axis"]
        F, S = np.eye(3), np.eye(3)
        for j in range(k):
            F = _rotation(axes[j], angles[j]) @ F
        for j in range(k + 1, len(axes)):
            S = _rotation(axes[j], angles[j]) @ S
        e = np.array(axes[k], float)
    else:
        F = np.array(g.get("fixed_rotation", np.eye(3).ravel())).reshape(3, 3)
        S = np.array(g.get("setting_rotation", np.eye(3).ravel())).reshape(3, 3)
        e = np.array(g["rotation_axis"], float)
    phi = scan["oscillation"][0]
    if cry.get("A_at_scan_points"):
        real = np.linalg.inv(np.array(cry["A_at_scan_points"][0]).reshape(3, 3))
    else:
        real = np.array([cry["real_space_a"], cry["real_space_b"], cry["real_space_c"]])
    expected = (S @ _rotation(e, phi) @ F @ real.T).T
    model = build_model(exp.replace(crystal=exp.crystal.replace(phisteps=1)), warn=lambda m: None)
    got = model.crystal.orientations[0] * 1e10
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10 * np.abs(expected).max())
    assert exp.crystal.osc == pytest.approx(scan["oscillation"][1])


def test_mosaic_model():
    doc = _doc("ssx_cunir_indexed.expt")
    exps = read_experiments(DATA / "ssx_cunir_indexed.expt")
    for e, entry in zip(exps, doc["experiment"]):
        c = doc["crystal"][entry["crystal"]]
        assert e.crystal.mosaic_spread == c["ML_half_mosaicity_deg"]
        a = np.linalg.norm(c["real_space_a"])
        assert e.crystal.Na == pytest.approx(c["ML_domain_size_ang"] / a, rel=1e-12)


def _predicted_spots(exp, dmin=3.0, max_excitation=2e-4):
    """Pixels where DIALS's Bragg condition puts spots: s1 = s0 + A h with |s1| = |s0|
    (to the excitation error), s1 extended until it meets a panel."""
    lam = exp.beam.wavelength
    s0 = np.asarray(exp.detector.beam_vector) / lam
    real = build_model(exp, warn=lambda m: None).crystal.real0 * 1e10
    A = np.linalg.inv(real)            # columns a*, b*, c*
    n = int(np.ceil(np.linalg.norm(real, axis=1).max() / dmin))
    r = np.arange(-n, n + 1)
    h = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    q = h @ A.T
    keep = (np.linalg.norm(q, axis=1) < 1 / dmin) & (np.abs(np.linalg.norm(s0 + q, axis=1) - 1 / lam) < max_excitation)
    spots = []
    for s1 in (s0 + q[keep]):
        for k, p in enumerate(exp.detector.panels):
            o, f, s = (np.asarray(v, float) for v in (p.origin, p.fast_axis, p.slow_axis))
            nrm = np.cross(f, s)
            t = (o @ nrm) / (s1 @ nrm)
            if t <= 0:
                continue
            x = t * s1 - o
            fx, sy = (x @ f) / p.pixel_size[0], (x @ s) / p.pixel_size[0]
            if 2 <= fx < p.image_size[0] - 2 and 2 <= sy < p.image_size[1] - 2:
                spots.append((k, fx, sy))
    return spots


def test_cspad_still_simulates_with_spots_where_dials_predicts():
    """A 64-panel CSPAD still from a refined DIALS model: the image has one slab per
    panel, and the brightest pixel near each predicted spot lies on it."""
    exp = read_experiments(DATA / "cspad_multi_stills_regression.json")[0]
    exp = exp.replace(crystal=exp.crystal.replace(Na=20, Nb=20, Nc=15),
                      structure=nbragg.Structure(default_F=100), sampling=nbragg.Sampling(oversample=1))
    r = nbragg.simulate(exp, warn=lambda m: None)
    assert r.image.shape == (64, 185, 194) and len(r.panels) == 64 and r.panels[0] == "ARRAY_D0Q0S0A0"
    assert np.all(np.isfinite(r.image)) and r.stats.pixels == 64 * 185 * 194
    spots = _predicted_spots(exp)
    assert len(spots) >= 5
    background = np.median(r.image)
    for k, fx, sy in spots:
        f0, s0 = int(fx), int(sy)
        patch = r.image[k, s0 - 2:s0 + 3, f0 - 2:f0 + 3]
        assert patch.max() > 100 * background, (k, fx, sy)
        ps, pf = np.unravel_index(np.argmax(patch), patch.shape)
        assert abs(s0 - 2 + ps + 0.5 - sy) <= 1.0 and abs(f0 - 2 + pf + 0.5 - fx) <= 1.0


def _models(doc, e):
    return {k: doc[k][e[k]] for k in ("beam", "detector", "goniometer", "scan", "crystal")
            if isinstance(e.get(k), int)}


@pytest.mark.parametrize("name", FILES)
def test_round_trip_is_exact(name, tmp_path):
    exps = read_experiments(DATA / name)
    out = tmp_path / "out.expt"
    write_experiments(out, exps)
    doc, again = _doc(name), json.loads(out.read_text())
    for e0, e1 in zip(doc["experiment"], again["experiment"]):
        assert _models(doc, e0) == _models(again, e1)           # the file's own numbers, untouched
        for k in ("identifier", "imageset", "profile", "scaling_model"):
            if isinstance(e0.get(k), int):
                assert doc[k][e0[k]] == again[k][e1[k]]
            elif k in e0:
                assert e1.get(k) == e0[k]
    # shared models stay shared
    assert len(again["detector"]) == len(doc["detector"]) and len(again["beam"]) == len(doc["beam"])
    for a, b in zip(exps, read_experiments(out)):
        from nbragg.io.dials import _same
        assert _same(a, b)


def test_refined_geometry_is_written_and_read_back(tmp_path):
    exp = read_experiments(DATA / "cspad_single_image.expt")[0]
    groups = dict(exp.detector.groups.groups())
    quadrant = next(p for p, g in groups.items() if g.name == "FS_D0Q1")
    moved = nbragg.set_params(exp, {f"group_shift_x[{quadrant}]": 0.2, "group_rot_z[FS_D0Q1]": 0.1,
                                    "panel_rot_x[5]": 0.05, "group_shift_z[root]": -1.0})
    out = tmp_path / "moved.expt"
    write_experiments(out, [moved])
    back = read_experiments(out)[0]
    assert back.detector.groups.groups()[0][1].shift == (0.0, 0.0, 0.0)     # motions folded into frames
    ref = build_model(moved, warn=lambda m: None).panels
    for kp, p in zip(ref, back.detector.panels):
        np.testing.assert_allclose(np.asarray(p.origin) / 1000, kp.pix0, rtol=0, atol=1e-12)
        np.testing.assert_allclose(p.fast_axis, kp.fdet, rtol=0, atol=1e-12)
        np.testing.assert_allclose(p.slow_axis, kp.sdet, rtol=0, atol=1e-12)
    # and an independent reader of the written file agrees
    lab = dials_reference.lab_panels(json.loads(out.read_text()))[0]
    for kp, r in zip(ref, lab):
        np.testing.assert_allclose(np.asarray(r["origin"]) / 1000, kp.pix0, rtol=0, atol=1e-12)
    # what nbragg does not model is untouched
    doc, again = _doc("cspad_single_image.expt"), json.loads(out.read_text())
    assert again["imageset"] == doc["imageset"] and again["beam"] == doc["beam"]


def test_a_nanobragg_experiment_written_for_dials(tmp_path):
    """An experiment built from nanoBragg's flags, written as an experiment list and read
    back, gives the same image."""
    args = ("-cell 70 80 90 75 85 95 -misset 10 5 3 -default_F 100 -N 5 -lambda 1.0 -distance 100 -pixel 0.4 "
            "-detpixels 12 -oversample 2 -polar 0.3 -detector_rotx 2 -twotheta 3 -phi 5 -osc 0.2 -phisteps 2")
    exp = nbragg.Experiment.from_nanobragg_args(args.split(), warn=lambda m: None)
    write_experiments(tmp_path / "nb.expt", exp)
    back = read_experiments(tmp_path / "nb.expt")[0]
    # DIALS's mosaic model holds one domain size: the mean of N times the cell edges
    edges = np.array(exp.crystal.cell[:3])
    sizes = np.array([back.crystal.Na, back.crystal.Nb, back.crystal.Nc]) * edges
    np.testing.assert_allclose(sizes, 5 * edges.mean(), rtol=1e-9)
    back = back.replace(structure=exp.structure, sampling=exp.sampling,
                        crystal=back.crystal.replace(Na=5, Nb=5, Nc=5, phisteps=2))   # exact integers again
    a = nbragg.simulate(exp, warn=lambda m: None).image
    b = nbragg.simulate(back, warn=lambda m: None).image
    np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12 * a.max())


@pytest.mark.parametrize("change, message", [
    (lambda d: d["beam"][0].update({"__id__": "polychromatic", "wavelength_range": [0.2, 10]}), "polychromatic"),
    (lambda d: d["beam"][0].update({"probe": "electron"}), "probe is 'electron'"),
    (lambda d: d["beam"][0].pop("wavelength"), "field 'wavelength' is missing"),
    (lambda d: d["detector"][0]["panels"][0].update({"pixel_size": [0.172, 0.2]}), "not square"),
    (lambda d: d["detector"][0]["panels"][0].update({"px_mm_strategy": {"type": "OffsetPxMmStrategy"}}),
     "OffsetPxMmStrategy"),
    (lambda d: d["experiment"][0].update({"beam": "beam.json"}), "given as 'beam.json'"),
    (lambda d: d["experiment"][0].update({"crystal": 7}), "crystal 7 does not exist"),
    (lambda d: d.update({"__id__": "Nothing"}), "expected 'ExperimentList'"),
    (lambda d: d["detector"][0].update({"panels": [3]}), "malformed content"),
    (lambda d: d["detector"][0].update({"hierarchy": [1, 2]}), "hierarchy node root is not a node"),
    (lambda d: d["detector"][0]["panels"][0].update({"mask": [["a", 0, 1, 1]]}), "mask"),
    (lambda d: d["detector"][0]["panels"][0].update({"image_size": [10.5, 20]}), "whole numbers"),
    (lambda d: d["detector"][0]["panels"][0].update({"mu": -1.0}), "mu -1.0 is negative"),
    (lambda d: d["goniometer"][0].update({"axes": [["x", 0, 0], [0, 1, 0]]}), "axes, angles or scan_axis"),
    (lambda d: d["crystal"][0].update({"real_space_a": [0, 0, 0], "real_space_b": [0, 0, 0]}), "coplanar"),
    (lambda d: d.update({"beam": {"direction": [0, 0, 1]}}), "'beam' is not a list"),
    (lambda d: d["beam"][0].update({"polarization_fraction": 2.0}), "polarization_fraction 2.0"),
    (lambda d: d["crystal"][0].update({"ML_half_mosaicity_deg": 0.1, "ML_domain_size_ang": 0}), "ML_domain_size_ang"),
    (lambda d: d["scan"][0].update({"properties": {"oscillation": [5.0]}}), "oscillation_width"),
])
def test_unsupported_content_gets_one_line(tmp_path, change, message):
    doc = _doc("i19_lcys_11_integrated.expt")
    change(doc)
    path = tmp_path / "bad.expt"
    path.write_text(json.dumps(doc))
    with pytest.raises(InputFileError, match=message) as err:
        read_experiments(path)
    assert "\n" not in str(err.value) and "bad.expt" in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(InputFileError, match="does not exist"):
        read_experiments(tmp_path / "missing.expt")
    bad = tmp_path / "bad.expt"
    bad.write_text('{"__id__": "ExperimentList",\n "experiment": [\n')
    with pytest.raises(InputFileError, match="line 3: not JSON"):
        read_experiments(bad)
    with pytest.raises(InputFileError, match="polychromatic"):
        read_experiments(DATA / "sxd_nacl_tof_imported.expt")
    with pytest.raises(InputFileError, match=r"image 99 is outside the scan's image_range \[1, 10\]"):
        read_experiments(DATA / "i19_lcys_11_integrated.expt", image=99)


def test_later_images_of_a_scan():
    doc = _doc("i19_lcys_11_integrated.expt")
    first, _ = doc["scan"][0]["image_range"]
    phi0, width = doc["scan"][0]["oscillation"]
    exp = read_experiments(DATA / "i19_lcys_11_integrated.expt", image=first + 3)[0]
    assert exp.crystal.phi0 == pytest.approx(phi0 + 3 * width) and math.isclose(exp.crystal.osc, width)


def test_command_line_experiment_list(tmp_path):
    """nbragg -expt FILE: the list's geometry and crystal, with nanoBragg's flags on top."""
    from nbragg.cli import run
    name = str(DATA / "ssx_cunir_indexed.expt")
    args = ["-expt", name, "-expt_index", "2", "-default_F", "100", "-N", "7", "-oversample", "1",
            "-roi", "1000", "1099", "1100", "1179", "-distance", "50", "-nopgm", "-nonoise", "-noprogress",
            "-floatfile", str(tmp_path / "f.bin"), "-intfile", str(tmp_path / "i.img")]
    import io
    warnings = []
    err = io.StringIO()
    assert run(args, stdout=io.StringIO(), stderr=err) == 0
    assert "-distance has no effect with -expt" in err.getvalue()
    exp = read_experiments(name)[2]
    panel = exp.detector.panels[0].replace(roi=(1000, 1099, 1100, 1179))
    exp = exp.replace(detector=exp.detector.replace(panels=[panel]), structure=nbragg.Structure(default_F=100),
                      crystal=exp.crystal.replace(Na=7, Nb=7, Nc=7), sampling=nbragg.Sampling(oversample=1))
    ref = nbragg.simulate(exp, warn=warnings.append).image.astype(np.float32)
    got = np.fromfile(tmp_path / "f.bin", dtype=np.float32).reshape(ref.shape)
    assert np.array_equal(got, ref) and got[1100:1180, 1000:1100].max() > 0
    for bad, text in [(["-expt_index", "9"], "-expt_index: 9 is not an experiment"),
                      (["-expt", str(tmp_path / "none.expt")], "-expt: experiment list .* does not exist")]:
        with pytest.raises(nbragg.ArgumentError, match=text):
            run(args + bad, stdout=io.StringIO(), stderr=io.StringIO())


def test_refine_command_takes_and_writes_an_experiment_list(tmp_path):
    """nbragg-refine with -expt: a four-quadrant detector written as an experiment list,
    one quadrant moved in the observed still; the refined list puts it back."""
    import io
    from test_multipanel import _quadrants
    from nbragg.noise import poisson_image
    from nbragg.refine_cli import run
    panels, root = _quadrants()
    exp = nbragg.Experiment(
        beam=nbragg.Beam(wavelength=1.0, fluence=1e28),
        detector=nbragg.Detector(convention="custom", beam_vector=(0, 0, -1), polar_vector=(1, 0, 0),
                                 spindle_axis=(1, 0, 0), panels=panels, groups=root),
        crystal=nbragg.Crystal(cell=(30, 32, 34, 90, 90, 90), misset=(12, 21, 33)))
    start = tmp_path / "start.expt"
    write_experiments(start, exp)
    back = read_experiments(start)[0]
    assert [g.name for _, g in back.detector.groups.groups()] == ["detector", "Q0", "Q1", "Q2", "Q3"]
    model_args = ["-expt", str(start), "-default_F", "100", "-N", "8", "-oversample", "2", "-fluence", "1e28"]
    truth = {"group_shift_x[Q1]": 0.2, "group_rot_z[Q1]": 0.1}
    true_exp = nbragg.set_params(nbragg.Experiment.from_nanobragg_args(model_args, warn=lambda m: None), truth)
    photons = nbragg.simulate(true_exp, warn=lambda m: None).image
    poisson_image(photons, np.random.default_rng(3)).astype("<f4").tofile(tmp_path / "obs.bin")
    report = tmp_path / "fit.json"
    out = io.StringIO()
    assert run([str(tmp_path / "obs.bin"), "--refine", "group_shift_x[Q1],group_shift_y[Q1],group_rot_z[Q1]",
                "--blur", "", "--report", str(report), "--"] + model_args, stdout=out) == 0
    rep = json.loads(report.read_text())
    for n, v in truth.items():
        assert abs(rep["values"][n] - v) <= 3 * rep["uncertainties"][n]
    refined = read_experiments(rep["experiment_list"])[0]
    want = build_model(true_exp, warn=lambda m: None).panels
    for kp, p in zip(want, refined.detector.panels):
        np.testing.assert_allclose(np.asarray(p.origin) / 1000, kp.pix0, rtol=0, atol=5e-6)   # within ~5 um
    assert rep["nanobragg_args"][rep["nanobragg_args"].index("-expt") + 1] == rep["experiment_list"]


def test_command_line_writes_every_panel(tmp_path):
    """-expt with a 64-panel CSPAD: one float file per panel and an NXmx file with one
    module per panel, each holding that panel's pixels."""
    import io
    import h5py
    from nbragg.cli import run
    name = str(DATA / "cspad_multi_stills_regression.json")
    args = ["-expt", name, "-default_F", "100", "-N", "10", "-oversample", "1", "-roi", "0", "39", "0", "29",
            "-nopgm", "-nonoise", "-noprogress", "-floatfile", str(tmp_path / "f.bin"),
            "-intfile", str(tmp_path / "i.img"), "-nxmx", str(tmp_path / "shot.h5")]
    assert run(args, stdout=io.StringIO(), stderr=io.StringIO()) == 0
    exp = nbragg.Experiment.from_nanobragg_args(args, warn=lambda m: None)
    ref = nbragg.simulate(exp, warn=lambda m: None).image.astype(np.float32)
    assert ref.shape == (64, 185, 194) and ref[:, :30, :40].max() > 0 and not ref[:, 30:, :].any()
    for k in (0, 17, 63):
        got = np.fromfile(tmp_path / f"f_{k:02d}.bin", dtype=np.float32).reshape(185, 194)
        assert np.array_equal(got, ref[k])
        assert (tmp_path / f"i_{k:02d}.img").exists()
    with h5py.File(tmp_path / "shot.h5", "r") as fh:
        assert np.array_equal(fh["/entry/data/data"][0], ref)
        assert len([g for g in fh["/entry/instrument/detector"] if g.startswith("module_")]) == 64


def test_structure_changes_are_written_as_a_new_detector(tmp_path):
    """A read experiment whose detector changed shape (no hierarchy, fewer panels, or
    nanoBragg's one panel) is written with the detector it now has."""
    exp = read_experiments(DATA / "cspad_single_image.expt")[0]
    moved = nbragg.set_params(exp, {"group_shift_x[FS_D0Q2]": 0.3})
    flat = moved.replace(detector=moved.detector.replace(groups=None))
    fewer = moved.replace(detector=moved.detector.replace(panels=moved.detector.panels[:5], groups=None))
    one = nbragg.Experiment.from_nanobragg_args("-cell 70 80 90 90 90 90 -default_F 1 -detpixels 16 -distance 80",
                                               warn=lambda m: None)
    nanobragg = moved.replace(detector=one.detector)
    for e in (flat, fewer, nanobragg):
        write_experiments(tmp_path / "x.expt", e)
        back = read_experiments(tmp_path / "x.expt")[0]
        want = build_model(e, warn=lambda m: None).panels
        assert len(back.detector.panels) == len(want)
        for kp, p in zip(want, back.detector.panels):
            np.testing.assert_allclose(np.asarray(p.origin) / 1000, kp.pix0, rtol=0, atol=1e-12)
            np.testing.assert_allclose(p.fast_axis, kp.fdet, rtol=0, atol=1e-12)


def test_crystal_changes_are_written_where_they_belong(tmp_path):
    name = "insulin_adsc_refined.expt"        # a scan-varying crystal (A_at_scan_points)
    exp = read_experiments(DATA / name)[0]
    doc = _doc(name)
    # N, mosaic spread and phi0 change: the orientation (and its scan points) stay
    e = exp.replace(crystal=exp.crystal.replace(Na=7, Nb=7, Nc=7, mosaic_spread=0.05, phi0=exp.crystal.phi0 + 2))
    write_experiments(tmp_path / "n.expt", e)
    out = json.loads((tmp_path / "n.expt").read_text())
    cry = out["crystal"][0]
    assert cry["A_at_scan_points"] == doc["crystal"][0]["A_at_scan_points"]
    assert cry["real_space_a"] == doc["crystal"][0]["real_space_a"]
    assert cry["ML_half_mosaicity_deg"] == 0.05
    assert out["scan"][0]["oscillation"][0] == pytest.approx(doc["scan"][0]["oscillation"][0] + 2)
    back = read_experiments(tmp_path / "n.expt")[0]
    assert back.crystal.Na == pytest.approx(7, rel=1e-12) and back.crystal.phi0 == pytest.approx(e.crystal.phi0)
    # a new orientation is written as the vectors, in the frame the goniometer's rotations
    # were taken out of
    e = nbragg.set_params(exp, {"misset_x": 0.4})
    write_experiments(tmp_path / "m.expt", e)
    back = read_experiments(tmp_path / "m.expt")[0]
    a = build_model(e, warn=lambda m: None).crystal.real0
    np.testing.assert_allclose(build_model(back, warn=lambda m: None).crystal.real0, a, rtol=0,
                               atol=1e-12 * np.abs(a).max())
    assert "A_at_scan_points" not in json.loads((tmp_path / "m.expt").read_text())["crystal"][0]


def test_scan_varying_setting_rotation_round_trip(tmp_path):
    doc = _doc("i19_lcys_11_integrated.expt")
    g = doc["goniometer"][0]
    n = doc["scan"][0]["image_range"][1] - doc["scan"][0]["image_range"][0] + 2
    g["setting_rotation_at_scan_points"] = [_rotation([0, 1, 0], 5.0).ravel().tolist()] * n
    src = tmp_path / "s.expt"
    src.write_text(json.dumps(doc))
    exp = nbragg.set_params(read_experiments(src)[0], {"misset_z": 0.3})
    write_experiments(tmp_path / "w.expt", exp)
    back = read_experiments(tmp_path / "w.expt")[0]
    a = build_model(exp, warn=lambda m: None).crystal.real0
    np.testing.assert_allclose(build_model(back, warn=lambda m: None).crystal.real0, a, rtol=0,
                               atol=1e-12 * np.abs(a).max())


def test_panel_fields_are_written(tmp_path):
    exp = read_experiments(DATA / "i19_lcys_11_integrated.expt")[0]
    p = exp.detector.panels[0].replace(mask=((0, 0, 5, 5),), trusted_range=(0.0, 1000.0), gain=2.5)
    e = exp.replace(detector=exp.detector.replace(panels=(p,)))
    write_experiments(tmp_path / "p.expt", e)
    q = read_experiments(tmp_path / "p.expt")[0].detector.panels[0]
    assert (q.mask, q.trusted_range, q.gain) == (((0, 0, 5, 5),), (0.0, 1000.0), 2.5)


def test_refined_experiment_written_into_its_list(tmp_path):
    """write_refined: one experiment of a list of five refined; the others, and the
    models it shared with them, stay as they were."""
    from nbragg.io.dials import write_refined
    name = "ssx_cunir_indexed.expt"
    exp = read_experiments(DATA / name)[2]
    moved = nbragg.set_params(exp, {"group_shift_z[root]": 0.5})
    write_refined(tmp_path / "r.expt", moved)
    doc, out = _doc(name), json.loads((tmp_path / "r.expt").read_text())
    assert out["detector"][:len(doc["detector"])] == doc["detector"]          # shared: added anew
    assert [e.get("detector") for e in out["experiment"]] == [0, 0, len(doc["detector"]), 0, 0]
    back = read_experiments(tmp_path / "r.expt")
    assert back[2].detector.panels[0].origin[2] == pytest.approx(exp.detector.panels[0].origin[2] + 0.5)
    assert back[1].detector.panels[0].origin == exp.detector.panels[0].origin


def test_command_line_takes_the_lists_cell_for_sizes_and_refuses_a_list_without_crystal(tmp_path):
    name = DATA / "insulin_adsc_refined.expt"
    exp = nbragg.Experiment.from_nanobragg_args(["-expt", str(name), "-xtal_size", "0.001", "-default_F", "1"],
                                               warn=lambda m: None)
    a = np.linalg.norm(read_experiments(name)[0].crystal.cell[0])
    assert exp.crystal.Na == math.ceil(0.001e-3 / (a * 1e-10))
    imported = str(DATA / "kappa_pilatus6m_ag_imported.expt")
    with pytest.raises(nbragg.ArgumentError, match="has no crystal; give -cell or -mat"):
        nbragg.Experiment.from_nanobragg_args(["-expt", imported, "-default_F", "1"], warn=lambda m: None)
    with_cell = nbragg.Experiment.from_nanobragg_args(["-expt", imported, "-default_F", "1", "-cell", "40", "50",
                                                       "60", "90", "90", "90"], warn=lambda m: None)
    assert with_cell.crystal.cell == pytest.approx((40, 50, 60, 90, 90, 90))
    # the image of another experiment's scan does not matter
    ssx = str(DATA / "i19_lcys_11_integrated.expt")
    e = nbragg.Experiment.from_nanobragg_args(["-expt", ssx, "-expt_image", "5", "-default_F", "1"],
                                             warn=lambda m: None)
    assert e.crystal.phi0 == pytest.approx(_doc("i19_lcys_11_integrated.expt")["scan"][0]["oscillation"][0] + 4 * 0.1)


def test_placement_parameters_are_refused_on_panels():
    exp = read_experiments(DATA / "i19_lcys_11_integrated.expt")[0]
    with pytest.raises(nbragg.ParameterError, match="Detector.panels"):
        nbragg.set_params(exp, {"distance": 50})
    with pytest.raises(nbragg.ParameterError, match="leaves panel 1 out"):
        nbragg.Detector(panels=[exp.detector.panels[0]] * 2, groups=nbragg.PanelGroup(children=(0,)))


def test_a_dataset_of_many_panels_is_refused_clearly(tmp_path):
    from nbragg.dataset import DatasetError, generate
    spec = {"seed": 1, "images": 2, "shard_size": 2, "outputs": {"float": True, "counts": "uint16"},
            "base": f"-expt {DATA / 'cspad_multi_stills_regression.json'} -default_F 1 -oversample 1"}
    with pytest.raises(DatasetError, match="64 panels"):
        generate(spec, tmp_path / "mp.h5", workers=0, progress=False)
