"""nbragg-noisify against noisify.c: every public golden case byte for byte (SMV, noise
and PGM files), the printed settings and statistics line by line, and the command line's
errors."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from nbragg import noisify_cli
from nbragg.noisify import apply_psf, noisify

GOLDEN = Path(__file__).parent / "golden_noisify"
CASES = json.loads((GOLDEN / "cases.json").read_text())["cases"]


def _run_case(case, tmp_path, capsys, monkeypatch):
    for item in case["files"]["inputs"]:
        shutil.copy(GOLDEN / case["name"] / item["path"], tmp_path / item["name_in_args"])
    monkeypatch.chdir(tmp_path)
    assert noisify_cli.run(case["args"]) == 0
    return capsys.readouterr()


def _printed(text):
    # the first line names the program, and warnings are worded (and sent) differently
    return [line for line in text.splitlines()[1:] if not line.startswith("WARNING")]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_golden_case_files_match_byte_for_byte(case, tmp_path, capsys, monkeypatch):
    out = _run_case(case, tmp_path, capsys, monkeypatch)
    for item in case["files"]["outputs"]:
        got = (tmp_path / item["written_by_C_as"]).read_bytes()
        want = (GOLDEN / case["name"] / item["path"]).read_bytes()
        assert got == want, item["written_by_C_as"]
    written = {p.name for p in tmp_path.iterdir()} - {i["name_in_args"] for i in case["files"]["inputs"]}
    assert written == {i["written_by_C_as"] for i in case["files"]["outputs"]}
    c_lines = _printed((GOLDEN / case["name"] / "c_stdout.txt").read_text())
    assert _printed(out.out) == c_lines


def _float_input(tmp_path, image):
    path = tmp_path / "in.bin"
    path.write_bytes(np.ascontiguousarray(image, dtype="<f4").tobytes())
    return path


@pytest.mark.parametrize("argv,needle", [
    ([], "no input image"),
    (["-floatfile", "missing.bin"], "missing.bin"),
    (["-floatfile", "in.bin", "-seed"], "-seed: missing value"),
    (["-floatfile", "in.bin", "-gain", "abc"], "-gain: value 'abc' is not a number"),
    (["-floatfile", "in.bin", "-bits", "8"], "-bits"),
    (["-floatfile", "in.bin", "-psf", "blob"], "-psf: unknown point-spread function 'blob'"),
    (["-floatfile", "in.bin", "-psf_radius", "-2"], "-psf_radius"),
    (["-floatfile", "in.bin", "-detpixels", "20"], "holds 64 values; the 20x20 grid needs 400"),
    (["-floatfile", "in.bin", "-intfile", "nodir/x.img"], "-intfile"),
    (["-floatfile", "in.bin", "-noisefile", "/proc/x.img"], "/proc/x.img"),
    (["-floatfile", "nan.bin"], "not finite"),
])
def test_errors_name_the_flag_and_write_nothing(argv, needle, tmp_path, monkeypatch, capsys):
    _float_input(tmp_path, np.ones((8, 8)))
    (tmp_path / "nan.bin").write_bytes(np.array([1.0, np.nan, 2.0, 3.0], dtype="<f4").tobytes())
    monkeypatch.chdir(tmp_path)
    assert noisify_cli.main(argv) == 2
    lines = capsys.readouterr().err.splitlines()
    errors = [line for line in lines if not line.startswith("WARNING")]
    assert len(errors) == 1 and errors[0].startswith("nbragg-noisify: error:") and needle in errors[0]
    # (a noise file that cannot be written comes after the noiseless ones)
    assert {p.name for p in tmp_path.iterdir()} - {"intimage.img", "image.pgm"} == {"in.bin", "nan.bin"}


def test_seeds_are_read_as_the_c_reads_them():
    """atoi: strtol's long, cut to an int; then negated."""
    st = noisify_cli.parse(["-seed", "3000000000", "-calib_seed", "99999999999999999999999"], print)
    assert st.seed == 1294967296 and st.calib_seed == 1
    assert noisify_cli.parse(["-psf_radius", "-0.5"], print).psf_radius == 0


def test_guessed_grid_and_faint_pixels_under_a_gaussian_psf(tmp_path, monkeypatch, capsys):
    """A 160x96 file without a size is guessed as 120x128 (the C's rule); with -nonoise a
    Gaussian PSF's automatic radius is undefined under 0.01 photons, and that light is
    dropped, with a warning."""
    image = np.full((96, 160), 0.005, dtype=np.float32)
    image[40, 60] = 50.0
    _float_input(tmp_path, image)
    monkeypatch.chdir(tmp_path)
    assert noisify_cli.main(["-floatfile", "in.bin", "-nonoise", "-psf", "gauss", "-psf_fwhm", "200",
                             "-adc", "0", "-bits", "32", "-nopgm"]) == 0
    out = capsys.readouterr()
    assert "(120x128 pixels)" in out.out and "guessing" in out.err and "their light is dropped" in out.err
    run = noisify(image.reshape(128, 120), psf="gauss", psf_fwhm_pixels=2.0, calculate_noise=False, adc=0.0)
    assert run.psf.dropped_pixels == image.size - 1
    assert run.photons.sum() == pytest.approx(50.0, rel=1e-3)   # the spot's photons; the faint ones are gone


def test_flags_the_c_would_ignore_or_misread_are_warned_about(tmp_path, monkeypatch, capsys):
    _float_input(tmp_path, np.ones((8, 8)))
    monkeypatch.chdir(tmp_path)
    assert noisify_cli.main(["-floatfile", "in.bin", "-detpixels", "8", "-gian", "2", "-readout_nois", "1",
                             "-adc", "-5", "-nopgm"]) == 0
    err = capsys.readouterr().err
    assert "unknown flag -gian ignored; did you mean -gain?" in err
    assert "-readout_nois is not a noisify flag; noisify.c reads it as -readout_noise" in err
    assert "-5" not in err.replace("-adc", "")       # a value, not a flag
    assert (tmp_path / "intimage.img").exists() and not (tmp_path / "image.pgm").exists()


def test_negative_pixel_values_are_clipped_not_wrapped(tmp_path, monkeypatch, capsys):
    _float_input(tmp_path, np.zeros((16, 16)))
    monkeypatch.chdir(tmp_path)
    assert noisify_cli.main(["-floatfile", "in.bin", "-detpixels", "16", "-adc", "0", "-readout", "5",
                             "-calibration", "0"]) == 0
    assert "below 0 were set to 0" in capsys.readouterr().err
    noise = np.frombuffer((tmp_path / "noiseimage.img").read_bytes()[512:], "<u2")
    assert noise.min() == 0 and noise.max() < 100 and np.count_nonzero(noise) > 0


@pytest.mark.parametrize("kind", ["gauss", "fiber"])
@pytest.mark.parametrize("radius", [0, 6])
def test_psf_keeps_the_photons(kind, radius):
    """The kernel integrates to 1 and the light outside its radius is added back, so
    spots away from the edges keep their photons: to float32 rounding with a wide radius,
    and within the automatic radius's design (sqrt(I)/10 photons per spot) otherwise."""
    image = np.zeros((41, 41), dtype=np.float32)
    image[20, 20] = 1000.0
    image[10, 25] = 50.0
    run = apply_psf(image, kind, 2.0, radius)
    if radius:
        # the tail outside the radius is estimated for a disc, the kernel made of pixels:
        # exact for the Gaussian's negligible tail, within 0.1 % for the fiber's long one
        budget = (2e-6 if kind == "gauss" else 1e-3) * image.sum()
    else:
        budget = (np.sqrt(1000.0) + np.sqrt(50.0)) / 10
    if kind == "gauss" or radius:
        assert abs(run.image.sum() - image.sum()) <= budget
    else:   # the fiber's automatic radius (414 pixels here) reaches past the detector: light leaves it
        assert run.auto_radius == 414 and image.sum() * 0.9 < run.image.sum() < image.sum()
    assert run.image[20, 20] < 1000.0 and run.image[20, 22] > run.image[20, 24] > 0
    single = apply_psf(np.where(image == 1000.0, image, 0), kind, 2.0, radius).image
    np.testing.assert_allclose(single[20, 17:20], single[20, 21:24][::-1], rtol=1e-6)
    np.testing.assert_allclose(single[17:20, 20], single[20, 21:24][::-1], rtol=1e-6)
    if radius == 0:
        assert run.auto_radius > 1


def test_noisify_api_with_the_same_seed_repeats_and_counts_are_poisson():
    image = np.full((64, 64), 30.0)
    a = noisify(image, calibration=0.0, seed=-5)
    b = noisify(image, calibration=0.0, seed=-5)
    np.testing.assert_array_equal(a.noise16, b.noise16)
    counts = a.counts.ravel()
    assert counts.mean() == pytest.approx(30.0, rel=0.02) and counts.var() == pytest.approx(30.0, rel=0.1)
    np.testing.assert_array_equal(a.noise16.ravel(), (counts + 40.0).astype(np.uint16))


def test_the_draws_count_no_references():
    """ran1, gaussdev and poidev run once per draw and take the generator's arrays:
    compiled without Numba's runtime, their machine code counts no references (which cost
    two atomic operations per array per draw: half of a noise image's time).  (Cached
    code cannot be inspected: each is compiled afresh with its own options.)"""
    import re
    import numba
    from nbragg import rng
    gen = rng.NRGenerator()
    for function in (rng.ran1, rng.gaussdev, rng.poidev):
        options = dict(function.targetoptions)
        assert options.get("_nrt") is False, function.__name__
        options.pop("cache", None)
        options.pop("nopython", None)
        fresh = numba.njit(**options)(function.py_func)
        args = (gen.seed_cell(-3), gen.state) + ((gen.fstate,) if function is not rng.ran1 else ())
        if function is rng.poidev:
            args = (np.float32(20.0),) + args
        fresh(*args)
        ir = fresh.inspect_llvm(fresh.signatures[0])
        assert "define" in ir and not re.search(r"call \w* ?void @NRT_(incref|decref)", ir), function.__name__
        if function is not rng.ran1:          # (ran1's own pairs Numba removes; the loops' it keeps)
            options.pop("_nrt")
            counted = numba.njit(**options)(function.py_func)       # (what the check sees without)
            counted(*args)
            assert re.search(r"call \w* ?void @NRT_incref", counted.inspect_llvm(counted.signatures[0]))
