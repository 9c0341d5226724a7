"""SMV, noise and PGM files: byte for byte against nanoBragg.c's, and readable by fabio."""

import io
import re

import numpy as np
import pytest

from conftest import GOLDEN, copy_case_inputs, golden_case, golden_cases, golden_image

from nbragg import cli
from nbragg.engine import build_model
from nbragg.io.pgm import pgm_bytes
from nbragg.io.smv import read_smv, smv_header
from nbragg.nbargs import parse_nanobragg_args
from nbragg.noise import c_int_image, c_noise_image, c_pgm_image

SMV_CASES = [c["name"] for c in golden_cases() if any(o["path"] == "intimage.img" for o in c["files"]["outputs"])]
PGM_CASES = [c["name"] for c in golden_cases() if any(o["path"] == "image.pgm" for o in c["files"]["outputs"])]


def _setup(name):
    case = golden_case(name)
    parsed = parse_nanobragg_args(case["args"], cwd=str(GOLDEN / name), warn=lambda m: None)
    model = build_model(parsed.experiment, warn=lambda m: None)
    return case, parsed, model


@pytest.mark.parametrize("name", SMV_CASES)
def test_int_and_noise_files_bit_exact_from_c_float_image(name):
    case, parsed, model = _setup(name)
    o = parsed.outputs
    f32 = golden_image(case)
    roi = model.detector.roi
    fields = cli._header_fields(model, parsed.experiment)
    ours_int = smv_header(fields) + c_int_image(f32, roi, o.intfile_scale, o.adc_offset).astype("<u2").tobytes()
    assert ours_int == (GOLDEN / name / "intimage.img").read_bytes()
    noise, total, overloads = c_noise_image(f32, roi, o.seed, o.adc_offset)
    ours_noise = smv_header(fields, noise=True) + noise.astype("<u2").tobytes()
    assert ours_noise == (GOLDEN / name / "noiseimage.img").read_bytes()
    assert total == pytest.approx(case["c_stats"]["noise_photons"], abs=1)
    assert overloads == case["c_stats"]["noise_overloads"]


@pytest.mark.parametrize("name", PGM_CASES)
def test_pgm_bit_exact_from_c_float_image(name):
    case, parsed, model = _setup(name)
    f32 = golden_image(case)
    scale = case["c_stats"]["pgm_scale"]
    # the C prints the scale with %g; recompute it from the float image as the C does
    from nbragg.engine import compute_stats
    stats = compute_stats(model, f32.astype(np.float64), 0.0)
    scale = 250.0 / (5.0 * stats.rmsd)
    assert scale == pytest.approx(case["c_stats"]["pgm_scale"], rel=1e-5)
    data = pgm_bytes(c_pgm_image(f32, model.detector.roi, scale), scale)
    assert data == (GOLDEN / name / "image.pgm").read_bytes()


def _numpy_int_image(img, roi, scale, adc):
    # the C's arithmetic as whole-image numpy steps (the obviously-correct reference)
    test = np.clip(img.astype(np.float32).astype(np.float64) * scale + adc, 0.0, 65535.0)
    with np.errstate(invalid="ignore"):
        out = np.floor((test + 0.5).astype(np.float32)).astype(np.uint16)
    out[np.isnan(test)] = 0
    return _numpy_outside_roi_zero(out, roi)


def _numpy_pgm_image(img, roi, scale):
    v = np.minimum(img.astype(np.float32).astype(np.float64) * scale, 255.0)
    with np.errstate(invalid="ignore"):
        out = np.trunc(v).astype(np.int64).astype(np.uint8)
    out[~np.isfinite(v)] = 0
    return _numpy_outside_roi_zero(out, roi)


def _numpy_outside_roi_zero(img, roi):
    xmin, xmax, ymin, ymax = roi
    keep = np.zeros(img.shape, dtype=bool)
    keep[max(ymin, 0):ymax + 1, max(xmin, 0):xmax + 1] = True
    img[~keep] = 0
    return img


@pytest.mark.parametrize("roi", [(0, 36, 0, 28), (3, 20, 5, 9), (-4, 50, -2, 70), (10, 5, 0, 28)])
def test_int_and_pgm_images_at_the_edges_match_the_cs_arithmetic(roi):
    rng = np.random.default_rng(5)
    img = rng.uniform(-3.0, 3000.0, (29, 37)).astype(np.float32)
    img[0, :6] = [-1e-9, 65535.4999 / 20.0, 65535.5 / 20.0, 1e30, -1e30, np.nan]
    img[1, :3] = [np.inf, -np.inf, 0.0249999]
    img[2, :4] = [12.7, -12.7, -300.0, 255.0 / 20.0]
    for scale, adc in ((20.0, 40.0), (20.0, 0.0), (0.37, 10.0)):
        assert np.array_equal(c_int_image(img, roi, scale, adc), _numpy_int_image(img, roi, scale, adc))
        assert np.array_equal(c_pgm_image(img, roi, scale), _numpy_pgm_image(img, roi, scale))


def test_statistics_of_a_float32_image_are_those_of_its_doubles():
    from nbragg.engine import compute_stats
    case, parsed, model = _setup(SMV_CASES[0])
    f32 = golden_image(case)
    assert compute_stats(model, f32, 0.0) == compute_stats(model, f32.astype(np.float64), 0.0)


GEOMETRY_KEYS = ["SIZE1", "SIZE2", "PIXEL_SIZE", "DISTANCE", "WAVELENGTH", "BEAM_CENTER_X", "BEAM_CENTER_Y",
                 "ADXV_CENTER_X", "ADXV_CENTER_Y", "MOSFLM_CENTER_X", "MOSFLM_CENTER_Y", "DENZO_X_BEAM",
                 "DENZO_Y_BEAM", "XDS_ORGX", "XDS_ORGY", "CLOSE_DISTANCE", "PHI", "OSC_RANGE", "TWOTHETA"]


def _keys(header):
    return dict(re.findall(r"([A-Z_0-9]+)=([^;\n]*)", header))


@pytest.mark.parametrize("name", sorted(set(SMV_CASES) | set(PGM_CASES)))
def test_end_to_end_files_match(name, tmp_path, monkeypatch):
    case = golden_case(name)
    monkeypatch.chdir(tmp_path)
    copy_case_inputs(case, tmp_path)
    assert cli.run(case["args"] + ["-noprogress"], stdout=io.StringIO(), stderr=io.StringIO()) == 0
    for fname in ("intimage.img", "noiseimage.img"):
        ref_path = GOLDEN / name / fname
        if not ref_path.exists():
            continue
        ours, ref = read_smv(tmp_path / fname), read_smv(ref_path)
        assert np.mean(ours.data == ref.data) >= 0.9999
        ko, kr = _keys(ours.header), _keys(ref.header)
        for key in GEOMETRY_KEYS:
            assert ko[key] == kr[key], key
        assert ko["DIALS_ORIGIN"] == kr["DIALS_ORIGIN"]
    if (GOLDEN / name / "image.pgm").exists():
        ours = (tmp_path / "image.pgm").read_bytes()
        ref = (GOLDEN / name / "image.pgm").read_bytes()
        assert ours[:ours.index(b"255\n") + 4] == ref[:ref.index(b"255\n") + 4]
        a = np.frombuffer(ours[-case["fpixels"] * case["spixels"]:], dtype=np.uint8)
        b = np.frombuffer(ref[-case["fpixels"] * case["spixels"]:], dtype=np.uint8)
        assert np.mean(a == b) >= 0.9999


def test_fabio_reads_our_smv_files(tmp_path, monkeypatch):
    fabio = pytest.importorskip("fabio")
    case = golden_case("mat_hkl_nearest_nonsquare_mask")
    monkeypatch.chdir(tmp_path)
    copy_case_inputs(case, tmp_path)
    assert cli.run(case["args"] + ["-noprogress"], stdout=io.StringIO(), stderr=io.StringIO()) == 0
    for fname in ("intimage.img", "noiseimage.img"):
        ours = read_smv(tmp_path / fname)
        img = fabio.open(str(tmp_path / fname))
        assert img.data.shape == (case["spixels"], case["fpixels"])
        assert np.array_equal(np.asarray(img.data, dtype=np.uint16), ours.data)
        for key in ("SIZE1", "SIZE2", "PIXEL_SIZE", "DISTANCE", "WAVELENGTH", "BEAM_CENTER_X", "BEAM_CENTER_Y",
                    "CLOSE_DISTANCE", "PHI", "OSC_RANGE"):
            assert float(img.header[key]) == float(_keys(ours.header)[key])


def test_default_output_files_are_nanobraggs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = "-cell 100 100 100 90 90 90 -default_F 100 -N 5 -lambda 6.2 -distance 100 -pixel 0.1 -detpixels 16".split()
    assert cli.run(args, stdout=io.StringIO(), stderr=io.StringIO()) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["floatimage.bin", "image.pgm", "intimage.img", "noiseimage.img"]
    assert (tmp_path / "floatimage.bin").stat().st_size == 16 * 16 * 4


def test_atomic_write_leaves_no_partial_file(tmp_path):
    from nbragg.io.atomic import atomic_write
    target = tmp_path / "out.bin"
    atomic_write(target, b"old")
    with pytest.raises(TypeError):
        atomic_write(target, None)   # fails while writing
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_atomic_write_takes_arrays_as_raw_bytes(tmp_path):
    from nbragg.io.atomic import atomic_write
    target = tmp_path / "out.bin"
    data = np.arange(6, dtype="<u2").reshape(2, 3)
    atomic_write(target, b"head", data, np.array([1.5], dtype="<f4"))
    assert target.read_bytes() == b"head" + data.tobytes() + np.array([1.5], dtype="<f4").tobytes()
    with pytest.raises((ValueError, BufferError, TypeError)):
        atomic_write(target, b"head", data[:, ::2])       # not contiguous: refused, nothing written
    assert target.read_bytes() == b"head" + data.tobytes() + np.array([1.5], dtype="<f4").tobytes()
