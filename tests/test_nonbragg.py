"""nbragg-nonbragg against nonBragg.c (tests/golden_nonbragg, see its README).

* every case simulated through the command line: the float image against the C's
  (correlation, total, pixels within 1e-5), the printed set-up line by line and the
  printed statistics;
* every case's conversions fed the C's own float image: the SMV integer and noise files
  and the PGM byte for byte, and the printed statistics (with the C's quirky rmsd) line
  by line, independently of the simulation;
* the C defects not reproduced, checked as documented: the out-of-order table of
  ``shortwater_path_dependent_oversample2`` (sorted here, so only pixels away from the
  out-of-order rows match), ``-nopgm`` honoured and negative pixels 0 in the PGM
  (``ice_rings_twotheta``);
* the command line's errors and warnings.
"""

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from nbragg import nonbragg_cli

GOLDEN = Path(__file__).parent / "golden_nonbragg"
CASES = json.loads((GOLDEN / "cases.json").read_text())["cases"]
IDS = [c["name"] for c in CASES]
OUT_OF_ORDER = "shortwater_path_dependent_oversample2"
NEGATIVE_PIXELS = "ice_rings_twotheta"       # given -nopgm, which the C ignores


def _case(name):
    return next(c for c in CASES if c["name"] == name)


def _inputs(case, dest):
    for item in case["files"]["inputs"]:
        raw = (GOLDEN / case["name"] / item["path"]).read_bytes()
        (dest / item["name_in_args"]).write_bytes(gzip.decompress(raw) if item["gzip"] else raw)


def _c_image(case):
    item = case["files"]["image"]
    raw = (GOLDEN / case["name"] / item["path"]).read_bytes()
    raw = gzip.decompress(raw) if item["gzip"] else raw
    return np.frombuffer(raw, dtype="<f4").reshape(case["spixels"], case["fpixels"])


def _run(case, tmp_path, capsys, monkeypatch, args=None, float_image=None):
    _inputs(case, tmp_path)
    monkeypatch.chdir(tmp_path)
    assert nonbragg_cli.run(case["args"] if args is None else args, float_image=float_image) == 0
    return capsys.readouterr()


def _c_lines(case):
    return (GOLDEN / case["name"] / "c_stdout.txt").read_text().splitlines()


def _setup(lines):
    """The set-up report: after the first line (it names the program), up to the blank
    line before the solid angle."""
    end = next(i for i in range(len(lines) - 1, 0, -1) if lines[i] == "")
    return lines[1:end]


def _written(case, tmp_path):
    return {p.name for p in tmp_path.iterdir()} - {i["name_in_args"] for i in case["files"]["inputs"]}


def figures(ours, theirs):
    """(correlation, sum ratio, fraction of pixels within 1e-5 relative) of two images."""
    a, b = ours.astype(np.float64).ravel(), theirs.astype(np.float64).ravel()
    r = float(np.corrcoef(a, b)[0, 1])
    return r, float(a.sum() / b.sum()), float(np.mean(np.abs(a - b) <= 1e-5 * np.abs(b)))


def _printed_stats(lines):
    """The numbers of the statistics lines."""
    got = {}
    for line in lines:
        w = line.split()
        if line.startswith("max_I = "):
            got.update(max_I=float(w[2]), max_I_fast_m=float(w[4]), max_I_slow_m=float(w[5]))
        elif line.startswith("mean= "):
            got.update(mean=float(w[1]), rms=float(w[3]), rmsd=float(w[5]))
        elif line.startswith("solid angle subtended"):
            got["solid_angle_sr"] = float(w[6])
        elif line.startswith("intfile_scale = "):
            got["intfile_scale"] = float(w[2])
        elif line.startswith("pgm_scale = "):
            got["pgm_scale"] = float(w[2])
        elif line.endswith("overloads)"):
            got.update(noise_photons=float(w[0]), noise_overloads=int(w[5].lstrip("(")))
    return got


def _stol_per_subpixel(case):
    """sin(theta)/lambda (1/A) of every sub-pixel, (spixels, fpixels, oversample^2), from
    the geometry the command resolves (one source along the beam)."""
    p = nonbragg_cli.plan(case["args"], warn=lambda m: None)
    d, os_ = p.model.detector, p.model.oversample
    sub = d.pixel / os_
    f = np.arange(case["fpixels"])[None, :, None, None]
    s = np.arange(case["spixels"])[:, None, None, None]
    k = np.arange(os_)
    Fdet = sub * (f * os_ + k[None, None, None, :]) + sub / 2.0
    Sdet = sub * (s * os_ + k[None, None, :, None]) + sub / 2.0
    pos = Fdet[..., None] * d.fdet + Sdet[..., None] * d.sdet + d.pix0
    diffracted = pos / np.linalg.norm(pos, axis=-1, keepdims=True)
    stol = 0.5 * np.linalg.norm(diffracted - d.beam, axis=-1) / p.model.wavelength / 1e10
    return stol.reshape(case["spixels"], case["fpixels"], -1)


# --------------------------------------------------------------------------- simulation

@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_simulated_image_matches_the_c(case, tmp_path, capsys, monkeypatch):
    out = _run(case, tmp_path, capsys, monkeypatch)
    want = _c_image(case)
    got = np.frombuffer((tmp_path / case["files"]["image"]["written_by_C_as"]).read_bytes(),
                        dtype="<f4").reshape(want.shape)
    r, ratio, within = figures(got, want)
    lines = out.out.splitlines()
    # the resolved settings, line by line as the C prints them
    assert _setup(lines) == _setup(_c_lines(case))
    written = _written(case, tmp_path)
    c_files = {case["files"]["image"]["written_by_C_as"]} | {o["written_by_C_as"] for o in case["files"]["outputs"]}
    if case["name"] == NEGATIVE_PIXELS:
        # not reproduced: nonBragg.c ignores -nopgm and writes image.pgm anyway
        assert "-nopgm" in case["args"] and written == c_files - {"image.pgm"}
    else:
        assert written == c_files
    if case["name"] == OUT_OF_ORDER:
        # not reproduced: the C interpolates an out-of-order table in the file's order with
        # a search that remembers the previous pixel; nbragg sorts the rows and says so
        assert "rows are not in increasing order" in out.err and "shortwater.stol" in out.err
        # the 4-point stencil reaches the swapped rows (0.2, 0.18) only for stol in
        # [0.12, 0.236); elsewhere the two programs interpolate the same rows
        stol = _stol_per_subpixel(case)
        away = np.all((stol < 0.12) | (stol >= 0.236), axis=-1)
        assert 0.4 < away.mean() < 0.95
        a, b = got[away].astype(np.float64), want[away].astype(np.float64)
        assert np.mean(np.abs(a - b) <= 1e-5 * np.abs(b)) >= 0.999
        assert np.corrcoef(a, b)[0, 1] >= 0.999999
        assert np.any(np.abs(got[~away] - want[~away]) > 1e-3 * np.abs(want[~away]))
        return
    assert r >= 0.999999 and abs(ratio - 1) <= 1e-6 and within >= 0.999, (r, ratio, within)
    # beyond the acceptance thresholds: the same double operations as the C (sin(theta)/
    # lambda, the Lagrange form) give its float image bit for bit, which the ill-conditioned
    # ice table needs; a change that loses this must say why here and in the README
    assert got.tobytes() == want.tobytes()
    printed = _printed_stats(lines)
    for key, value in case["c_stats"].items():
        if key == "pgm_scale" and "-nopgm" in case["args"]:
            continue
        assert printed[key] == pytest.approx(value, rel=1e-5, abs=1e-12), key


# --------------------------------------------------------------------------- conversions

@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_files_from_the_c_float_image_are_byte_identical(case, tmp_path, capsys, monkeypatch):
    out = _run(case, tmp_path, capsys, monkeypatch, float_image=_c_image(case))
    for item in case["files"]["outputs"]:
        name = item["written_by_C_as"]
        if case["name"] == NEGATIVE_PIXELS and name == "image.pgm":
            assert not (tmp_path / name).exists()       # -nopgm, honoured (see below)
            continue
        got = (tmp_path / name).read_bytes()
        want = (GOLDEN / case["name"] / item["path"]).read_bytes()
        # a PGM holds its header and one byte per pixel: the C's trailing garbage is not
        # written (the stored file is cut there too)
        assert got == want, name
        if "smv_header_text" in item:
            assert got[:512].decode("latin-1").split("\f")[0] == item["smv_header_text"]
    image = (tmp_path / case["files"]["image"]["written_by_C_as"]).read_bytes()
    assert image == _c_image(case).tobytes()
    # the report: everything the C prints but the solid angle (not known without simulating)
    c_lines = [line for line in _c_lines(case)[1:] if not line.startswith("solid angle")]
    if case["name"] == NEGATIVE_PIXELS:
        c_lines = [line for line in c_lines if "pgm" not in line]
    assert out.out.splitlines()[1:] == c_lines


def test_negative_pixels_are_0_in_the_pgm(tmp_path, capsys, monkeypatch):
    """ice_rings_twotheta without -nopgm: the C's bytes where its pixels are >= 0; where
    they are negative the C's cast is undefined (here the low byte of an int), nbragg
    writes 0."""
    case = _case(NEGATIVE_PIXELS)
    args = [a for a in case["args"] if a != "-nopgm"]
    image = _c_image(case)
    out = _run(case, tmp_path, capsys, monkeypatch, args=args, float_image=image)
    item = next(o for o in case["files"]["outputs"] if o["written_by_C_as"] == "image.pgm")
    want = (GOLDEN / case["name"] / item["path"]).read_bytes()
    got = (tmp_path / "image.pgm").read_bytes()
    assert len(got) == len(want) and item["C_file_bytes"] == len(want) + image.size
    n = image.size
    assert got[:-n] == want[:-n]
    got_px = np.frombuffer(got[-n:], np.uint8).reshape(image.shape)
    want_px = np.frombuffer(want[-n:], np.uint8).reshape(image.shape)
    negative = image < 0
    assert negative.sum() == case["numpy_stats"]["negative_pixels"] > 0
    assert np.array_equal(got_px[~negative], want_px[~negative])
    assert not got_px[negative].any() and want_px[negative].any()
    assert f"{negative.sum()} pixels are negative" in out.err


def test_statistics_keep_the_c_quirks():
    """rmsd reads each ROI pixel's successor (the last pixel reads a 0); the mean is over
    the ROI's pixels; rms squares in single precision."""
    img = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=np.float32)
    st = nonbragg_cli.image_stats(img, (0, 1, 0, 1), 1e-4, 1)     # pixels 1 2 4 5
    assert st.pixels == 4 and st.mean == 3.0 and st.max_I == 5.0
    assert st.rms == pytest.approx(np.sqrt((1 + 4 + 16 + 25) / 3))
    assert st.rmsd == pytest.approx(np.sqrt(((2 - 3) ** 2 + (3 - 3) ** 2 + (5 - 3) ** 2 + (6 - 3) ** 2) / 3))
    assert (st.max_I_x, st.max_I_y) == pytest.approx((1.5e-4, 1.5e-4))
    last = nonbragg_cli.image_stats(img, (2, 2, 1, 1), 1e-4, 2)    # pixel 6, followed by nothing
    assert last.rmsd == pytest.approx(np.sqrt((0 - 6) ** 2 / 1))
    assert (last.max_I_x, last.max_I_y) == pytest.approx((2.75e-4, 1.75e-4))


def test_intfile_rounding_and_roi():
    img = np.array([[0.25, -1.0, 1e9], [np.nan, 2.5, 3.0]], dtype=np.float32)
    got = nonbragg_cli.int_image(img, (0, 2, 0, 1), 1.0, 40.0)
    assert got.tolist() == [[40, 39, 65535], [0, 43, 43]]
    assert nonbragg_cli.int_image(img, (1, 2, 1, 1), 1.0, 40.0).tolist() == [[0, 0, 0], [0, 43, 43]]
    assert nonbragg_cli.pgm_image(img, (0, 2, 0, 1), 10.0).tolist() == [[2, 0, 255], [0, 25, 30]]


# --------------------------------------------------------------------------- command line

def test_flags_are_matched_as_the_c_matches_them():
    warnings = []
    st = nonbragg_cli.parse(["-stol", "t", "-thickness", "2", "-sample_width", "0.5", "-heigh", "0.25",
                             "-twotheta_axis", "12", "0", "1", "-MW", "20", "-molecular_weight", "22",
                             "-detsize", "50", "-detsize_y", "40", "-seed", "3000000000", "-Xbeam", "1",
                             "-Q", "q.txt", "-noisefile", "n.img", "-nonoise", "-pixels", "0.2"], warnings.append)
    assert (st.sample_x, st.sample_y, st.sample_z) == (0.002, 0.0005, 0.00025)
    assert st.twotheta_axis == (12.0, 0.0, 1.0) and st.twotheta_deg == 12.0 and st.pivot == "beam"
    assert st.molecular_weight == 22.0 and (st.detsize_x, st.detsize_y) == (0.05, 0.04)
    assert st.seed == 1294967296 and st.stolfile == "q.txt" and st.units == "Q"
    assert not st.calculate_noise and st.noisefile == "n.img" and st.pixel == 0.2 / 1000.0
    assert any("-twotheta_axis also acts as -twotheta" in w for w in warnings)
    assert any("-pixels is not a nonBragg flag" in w for w in warnings)
    st = nonbragg_cli.parse(["-MWx", "5", "-stolout", "x", "-dispstep", "3"], warnings.append)
    assert st.molecular_weight == 18.0 and st.stolfile is None
    assert any("unknown flag -MWx" in w for w in warnings)
    assert any("-dispstep is a nanoBragg flag" in w for w in warnings)


@pytest.mark.parametrize("argv,needle", [
    ([], "no structure-factor table"),
    (["-stol"], "-stol: missing value"),
    (["-stol", "water.stol", "-distance"], "-distance: missing value"),
    (["-stol", "water.stol", "-roi", "1", "2"], "-roi: missing values"),
    (["-stol", "water.stol", "-distance", "abc"], "-distance: value 'abc' is not a number"),
    (["-stol", "water.stol", "-oversample", "2.5"], "-oversample: value '2.5' is not an integer"),
    (["-stol", "missing.stol"], "-stol: table file 'missing.stol' does not exist"),
    (["-4stol", "dup.stol"], "-4stol: table file 'dup.stol': lines 2 and 3 give the same abscissa"),
    (["-stol", "water.stol", "-sourcefile", "none.txt"], "-sourcefile: source file 'none.txt' does not exist"),
    (["-stol", "water.stol", "-fdet_vector", "0", "0", "0"], "-fdet_vector: the zero vector"),
    (["-stol", "water.stol", "-pivot", "middle"], "-pivot: value 'middle'"),
    (["-stol", "water.stol", "-detpixels", "0"], "-detpixels: 0 pixels"),
    (["-stol", "water.stol", "-roi", "50", "60", "0", "5", "-detpixels", "16"], "-roi: 50 60 0 5 holds no pixel"),
    (["-stol", "water.stol", "-MW", "0"], "-MW: molecular weight 0"),
    (["-stol", "water.stol", "-beamsize", "0", "-flux", "1e12"], "-beamsize"),
    (["-stol", "water.stol", "-img", "in.img"], "-img: -img, nonBragg.c's inverse mode"),
    (["-stol", "water.stol", "-Fmap"], "-Fmap: the F map mode"),
    (["-stol", "water.stol", "-intfile", "nodir/x.img"], "-intfile"),
])
def test_errors_name_the_flag_and_write_nothing(argv, needle, tmp_path, monkeypatch, capsys):
    (tmp_path / "water.stol").write_text("0 2.57\n0.1 3\n0.2 4\n0.5 3\n")
    (tmp_path / "dup.stol").write_text("0 1\n0.1 2\n0.1 3\n")
    monkeypatch.chdir(tmp_path)
    small = ["-detpixels", "16"] if argv and "-detpixels" not in argv else []
    assert nonbragg_cli.main(small + argv) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if not line.startswith("WARNING")]
    assert len(errors) == 1 and errors[0].startswith("nbragg-nonbragg: error:") and needle in errors[0], errors
    assert "Traceback" not in captured.err
    assert {p.name for p in tmp_path.iterdir()} == {"water.stol", "dup.stol"}


def test_warnings_for_flags_the_c_ignores(tmp_path, monkeypatch, capsys):
    (tmp_path / "t.stol").write_text("0 2.57\n0.1 3\n0.2 4\n0.5 3\n")
    monkeypatch.chdir(tmp_path)
    assert nonbragg_cli.main(["-stol", "t.stol", "-detpixels", "8", "-distanc", "100", "-coherent", "-printout",
                              "-mosflm", "-nonoise", "-nopgm", "-curved_det"]) == 0
    err = capsys.readouterr().err
    assert "unknown flag -distanc ignored; did you mean -distance?" in err
    assert "-coherent has no effect" in err and "-printout is not supported" in err
    assert "-mosflm is a nanoBragg flag" in err
    assert "-curved_det ignored: nonBragg.c reads it only when another word follows it" in err
    assert {p.name for p in tmp_path.iterdir()} == {"t.stol", "floatimage.bin", "intimage.img"}


@pytest.mark.parametrize("flag", ["-h", "--help", "-help"])
def test_help(flag, capsys):
    assert nonbragg_cli.main([flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: nbragg-nonbragg") and "-stol" in out and "-seed" in out


def test_every_flag_in_the_help_is_one_it_reads(capsys):
    import re
    listed = set(re.findall(r"(?<![\w-])-[A-Za-z4][\w]*", nonbragg_cli.USAGE))
    assert not sorted(f for f in listed if f not in nonbragg_cli.KNOWN and f not in ("-h", "-help"))
    assert nonbragg_cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("nbragg-nonbragg ")


def test_past_the_end_of_the_table_as_the_c(tmp_path, capsys, monkeypatch):
    """Beyond its last row the table's F is the line through the last two rows, as in
    nonBragg.c (its far padding rows): an image made by the C, past the end of a short
    table where F turns negative, reproduced bit for bit (tests/golden_nonbragg_extra)."""
    here = Path(__file__).resolve().parent / "golden_nonbragg_extra" / "beyond_table_end"
    shutil.copy(here / "short.stol", tmp_path)
    monkeypatch.chdir(tmp_path)
    args = ("-stol short.stol -lambda 1 -distance 50 -pixel 0.5 -detpixels 32 -fluence 1e20 -nonoise -nopgm "
            "-floatfile short.bin -intfile short.img").split()
    assert nonbragg_cli.run(args) == 0
    got = np.fromfile(tmp_path / "short.bin", dtype="<f4")
    want = np.fromfile(here / "short.bin", dtype="<f4")
    assert np.sum(want < 0) == 161
    assert got.tobytes() == want.tobytes()
