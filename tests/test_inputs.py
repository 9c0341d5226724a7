"""Input files: HKL variants, the explicit structure-factor cache, progress bar, Python API."""

import io

import numpy as np
import pytest

import nbragg
from nbragg import cli
from nbragg.nbargs import parse_nanobragg_args

BASE = "-cell 60 60 60 90 90 90 -misset 10 20 30 -N 3 -lambda 2 -distance 100 -pixel 0.5 -detpixels 12".split()


def _hkl(path, extra_cols=0, fmt="{} {} {} {}"):
    rng = np.random.default_rng(0)
    lines = []
    for h in range(-4, 5):
        for k in range(-4, 5):
            for l in range(-4, 5):
                cols = [h, k, l, round(float(rng.uniform(1, 100)), 2)] + [7.5] * extra_cols
                lines.append(" ".join(str(c) for c in cols))
    path.write_text("\n".join(lines) + "\n")


def _image(args, cwd):
    return nbragg.simulate(parse_nanobragg_args(args, cwd=str(cwd), warn=lambda m: None).experiment,
                           warn=lambda m: None).image


def test_hkl_extra_columns_are_ignored(tmp_path):
    _hkl(tmp_path / "four.hkl")
    _hkl(tmp_path / "five.hkl", 1)
    _hkl(tmp_path / "six.hkl", 2)
    a = _image(BASE + ["-hkl", "four.hkl"], tmp_path)
    assert a.max() > 0
    assert np.array_equal(a, _image(BASE + ["-hkl", "five.hkl"], tmp_path))
    assert np.array_equal(a, _image(BASE + ["-hkl", "six.hkl"], tmp_path))


def test_non_integer_index_is_warned(tmp_path):
    (tmp_path / "f.hkl").write_text("0 0 0 10\n1 0.2 0 5\n")
    msgs = []
    parse_nanobragg_args(BASE + ["-hkl", "f.hkl"], cwd=str(tmp_path), warn=msgs.append)
    assert any("non-integer k" in m and "line 2" in m for m in msgs)


def test_dump_is_written_and_read_only_when_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _hkl(tmp_path / "f.hkl")
    out = ["-nonoise", "-nopgm", "-noprogress"]
    assert cli.run(BASE + ["-hkl", "f.hkl", "-floatfile", "a.bin"] + out, stdout=io.StringIO(), stderr=io.StringIO()) == 0
    assert not (tmp_path / "Fdump.bin").exists()
    assert cli.run(BASE + ["-hkl", "f.hkl", "-dump", "cache.bin", "-floatfile", "b.bin"] + out,
                   stdout=io.StringIO(), stderr=io.StringIO()) == 0
    assert (tmp_path / "cache.bin").exists()
    assert cli.run(BASE + ["-dump", "cache.bin", "-floatfile", "c.bin"] + out,
                   stdout=io.StringIO(), stderr=io.StringIO()) == 0
    a = np.fromfile(tmp_path / "a.bin", dtype="<f4")
    assert np.array_equal(a, np.fromfile(tmp_path / "b.bin", dtype="<f4"))
    assert np.array_equal(a, np.fromfile(tmp_path / "c.bin", dtype="<f4"))


def test_progress_bar_does_not_change_the_image(tmp_path):
    exp = parse_nanobragg_args(BASE + ["-default_F", "10"], warn=lambda m: None).experiment
    from nbragg.engine import build_model, render
    m = build_model(exp, warn=lambda m: None)
    seen = []
    a, oa = render(m, progress=lambda done, total: seen.append((done, total)))
    b, ob = render(m)
    assert np.array_equal(a, b) and oa == ob
    assert seen[-1] == (12, 12)


def test_python_api_equals_command_line():
    exp = nbragg.Experiment(
        crystal=nbragg.Crystal(cell=(100, 100, 100, 90, 90, 90), Na=5, Nb=5, Nc=5),
        structure=nbragg.Structure(default_F=100),
        beam=nbragg.Beam.from_energy(12398.42 / 6.2),
        detector=nbragg.Detector(fpixels=32, spixels=32, pixel_size=0.1, distance=100),
    )
    assert exp.beam.wavelength == pytest.approx(6.2)
    args = "-cell 100 100 100 90 90 90 -default_F 100 -N 5 -lambda 6.2 -distance 100 -pixel 0.1 -detpixels 32"
    b = nbragg.simulate(nbragg.Experiment.from_nanobragg_args(args.split(), warn=lambda m: None)).image
    a = nbragg.simulate(exp).image
    assert np.allclose(a, b, rtol=1e-12, atol=0)
    r = nbragg.simulate(exp)
    assert r.stats.max_I == pytest.approx(a.max())
    assert r.settings["convention"] == "mosflm"
