"""User mistakes: exit status 2, one line on stderr naming the flag or file, no image."""

import subprocess
import sys

import numpy as np
import pytest

from nbragg import cli

GOOD = "-cell 100 100 100 90 90 90 -default_F 100 -N 5 -lambda 6.2 -distance 100 -pixel 0.1 -detpixels 16".split()
OUT = ["-floatfile", "out.bin", "-intfile", "out.img", "-noisefile", "noise.img", "-pgmfile", "out.pgm"]


def _files(tmp_path):
    (tmp_path / "good.hkl").write_text("0 0 0 100\n1 0 0 50\n0 1 0 20\n")
    (tmp_path / "words.hkl").write_text("0 0 0 100\n1 0 x 50\n")
    (tmp_path / "short.hkl").write_text("0 0 0 100\n1 0 0\n")
    (tmp_path / "empty.hkl").write_text("\n# nothing\n")
    (tmp_path / "short.mat").write_text("0.01 0 0\n0 0.01 0\n")
    (tmp_path / "words.mat").write_text("0.01 0 0\n0 0.01 0\n0 0 abc\n")
    (tmp_path / "bad_sources.txt").write_text("-10 0 0 1 1e-10\n-10 zero 0\n")
    (tmp_path / "notsmv.img").write_bytes(b"P5\n16 16\n255\n" + bytes(256) + bytes(600))
    hdr = b"{\nHEADER_BYTES=512;\nDIM=2;\nBYTE_ORDER=little_endian;\nTYPE=unsigned_short;\nSIZE1=16;\nSIZE2=16;\n}\f"
    (tmp_path / "short.img").write_bytes(hdr.ljust(512, b" ") + bytes(100))
    (tmp_path / "dir").mkdir()


CASES = {
    "missing hkl file": (GOOD + ["-hkl", "nothere.hkl"], "nothere.hkl"),
    "hkl is a folder": (GOOD + ["-hkl", "dir"], "dir"),
    "hkl line not numbers": (GOOD + ["-hkl", "words.hkl"], "line 2"),
    "hkl line too short": (GOOD + ["-hkl", "short.hkl"], "line 2"),
    "empty hkl": (GOOD + ["-hkl", "empty.hkl"], "no reflections"),
    "A matrix not 3x3": (GOOD[6:] + ["-mat", "short.mat"], "short.mat"),
    "A matrix not numbers": (GOOD[6:] + ["-mat", "words.mat"], "words.mat"),
    "missing mat": (GOOD[6:] + ["-mat", "nothere.mat"], "nothere.mat"),
    "mask not SMV": (GOOD + ["-mask", "notsmv.img"], "notsmv.img"),
    "mask data too short": (GOOD + ["-mask", "short.img"], "short.img"),
    "img not SMV": (GOOD + ["-img", "notsmv.img"], "notsmv.img"),
    "malformed sourcefile": (GOOD + ["-sourcefile", "bad_sources.txt"], "line 2"),
    "missing sourcefile": (GOOD + ["-sourcefile", "nothere.txt"], "nothere.txt"),
    "zero pixel": (GOOD + ["-pixel", "0"], "-pixel"),
    "negative distance": (GOOD + ["-distance", "-5"], "-distance"),
    "zero detpixels": (GOOD + ["-detpixels", "0"], "-detpixels"),
    "zero wavelength": (GOOD + ["-lambda", "0"], "-lambda"),
    "zero energy": (GOOD + ["-energy", "0"], "-energy"),
    "nan value": (GOOD + ["-distance", "nan"], "-distance"),
    "infinite value": (GOOD + ["-fluence", "inf"], "-fluence"),
    "non-numeric value": (GOOD + ["-N", "five"], "-N"),
    "non-numeric float": (GOOD + ["-lambda", "blue"], "-lambda"),
    "cell missing values": (["-cell", "100", "100", "-default_F", "1"], "-cell"),
    "cell angles make no cell": (["-cell", "100", "100", "100", "10", "20", "120", "-default_F", "1"], "-cell"),
    "negative N": (GOOD + ["-N", "-3"], "-N"),
    "roi min > max": (GOOD + ["-roi", "10", "5", "0", "15"], "-roi"),
    "roi outside detector": (GOOD + ["-roi", "20", "30", "0", "15"], "-roi"),
    "output folder missing": (GOOD + ["-floatfile", "nodir/out.bin"], "nodir"),
    "noise folder missing": (GOOD + ["-noisefile", "nodir/noise.img"], "nodir"),
    "no structure factors": (GOOD[:7] + GOOD[9:], "-default_F"),
    "no cell": (GOOD[7:], "-cell"),
    "flag without value": (GOOD + ["-distance"], "-distance"),
    "printout pixel outside": (GOOD + ["-printout_pixel", "40", "2"], "-printout_pixel"),
    "bad pivot": (GOOD + ["-pivot", "middle"], "-pivot"),
    "bad threads": (GOOD + ["-threads", "many"], "-threads"),
    "zero threads": (GOOD + ["-threads", "0"], "-threads: value 0 must be at least 1"),
    "detector_abs not a number": (GOOD + ["-detector_abs", "abc"], "-detector_abs"),
    "detector_abs nan": (GOOD + ["-detector_abs", "nan"], "-detector_abs"),
    "round divergence cut leaves no source": (GOOD + "-hdivrange 1 -vdivrange 1 -hdivstep 1 -vdivstep 1".split(),
                                              "-square_div"),
    "osc 0 with a phistep gives no phi step": (GOOD + ["-osc", "0", "-phistep", "0.1"], "-phisteps"),
    "negative sensor thickness": (GOOD + ["-detector_thick", "-1"], "-detector_thick"),
    "negative dmin": (GOOD + ["-dmin", "-1"], "-dmin"),
    "zero detector vector": (GOOD + ["-fdet_vector", "0", "0", "0"], "-fdet_vector"),
    "phi step in the wrong unit": (GOOD + ["-osc", "1", "-phistep", "1e-300"], "-phistep"),
    "divergence step in the wrong unit": (GOOD + ["-hdivrange", "1", "-hdivstep", "1e-9"], "-hdivstep"),
    "seed beyond 64 bits": (GOOD + ["-mosaic", "1", "-mosaic_seed", "99999999999999999999"], "-mosaic_seed"),
    "negative flux": (GOOD + ["-flux", "-1e12"], "-flux: -1e+12 photons/s"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_user_error_is_one_line_exit_2_no_output(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _files(tmp_path)
    before = set(p.name for p in tmp_path.iterdir())
    args, needle = CASES[name]
    status = cli.main(OUT + args)
    captured = capsys.readouterr()
    assert status == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("nbragg: error: ")
    assert needle in lines[0]
    assert "Traceback" not in captured.err
    assert set(p.name for p in tmp_path.iterdir()) == before


def test_too_many_threads_are_capped_with_a_warning(tmp_path, monkeypatch, capsys):
    import numba
    monkeypatch.chdir(tmp_path)
    status = cli.main(OUT + GOOD + ["-threads", "100000"])
    captured = capsys.readouterr()
    assert status == 0
    most = numba.config.NUMBA_NUM_THREADS
    assert f"WARNING: -threads 100000: this machine runs at most {most} threads; using {most}" in captured.err
    assert (tmp_path / "out.bin").stat().st_size == 16 * 16 * 4


def test_command_line_process_exit_status(tmp_path):
    import os
    from pathlib import Path
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run([sys.executable, "-m", "nbragg"] + GOOD + ["-hkl", "missing.hkl"],
                          cwd=tmp_path, capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "missing.hkl" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_python_api_errors_name_the_field():
    import nbragg
    with pytest.raises(nbragg.ParameterError, match="Detector.pixel_size"):
        nbragg.Detector(pixel_size=0)
    with pytest.raises(nbragg.ParameterError, match="Beam.wavelength"):
        nbragg.Beam(wavelength=-1)
    with pytest.raises(nbragg.ParameterError, match="Crystal.cell"):
        nbragg.Crystal(cell=(100, 100, 100, 10, 20, 150))
    with pytest.raises(nbragg.ParameterError, match="Crystal.Na"):
        nbragg.Crystal(Na=-2)
    with pytest.raises(nbragg.ParameterError, match="Detector.roi"):
        nbragg.Detector(fpixels=10, spixels=10, roi=(5, 2, 0, 3))
    with pytest.raises(nbragg.ParameterError, match="Detector.mask"):
        nbragg.Detector(fpixels=10, spixels=10, mask=np.ones((3, 3)))


def test_python_api_mistakes_are_parameter_errors():
    import nbragg
    with pytest.raises(nbragg.ParameterError, match="Detector.distance = '100' is text; give a number"):
        nbragg.Detector(distance="100")
    with pytest.raises(nbragg.ParameterError, match="Detector.fpixels = 32 without Detector.spixels"):
        nbragg.Detector(fpixels=32)
    with pytest.raises(nbragg.ParameterError, match="Detector.spixels = 'abc' is not an integer"):
        nbragg.Detector(fpixels=3, spixels="abc")
    assert (nbragg.Detector().fpixels, nbragg.Detector().spixels) == (1024, 1024)
    exp = nbragg.Experiment.from_nanobragg_args("-cell 100 100 100 90 90 90 -default_F 1 -detpixels 8 -N 2")
    assert (exp.detector.fpixels, exp.crystal.Na) == (8, 2.0)
    with pytest.raises(nbragg.ParameterError, match="jacobian: no parameter names"):
        nbragg.jacobian(exp, [])
    said = []
    zero = exp.replace(structure=exp.structure.replace(default_F=0.0))
    assert not nbragg.simulate(zero, warn=said.append).image.any()
    assert any("no structure factors" in m and "every pixel is 0" in m for m in said), said


def test_import_and_cpu_work_need_no_cuda_packages():
    """numba-cuda is an optional extra: importing nbragg and simulating on the CPU must not
    import it (and asking for CUDA where it is missing is a clear error, see test_cuda)."""
    import subprocess
    import sys
    code = ("import sys, nbragg\n"
            "nbragg.simulate(nbragg.Experiment(detector=nbragg.Detector(fpixels=4, spixels=4)), precision='float32')\n"
            "bad = [m for m in sys.modules if m.startswith(('numba_cuda', 'numba.cuda'))]\n"
            "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
