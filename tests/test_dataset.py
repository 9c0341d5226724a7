"""HDF5/NXmx datasets: layout, NeXus validation, re-simulation, crash safety, Dask."""

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import nbragg
from nbragg.dataset import (DatasetError, base_experiment, frame_experiment, generate, load_spec,
                            read_frame, read_parameters)

ROOT = Path(__file__).resolve().parents[1]

SPEC = {
    "seed": 7,
    "images": 10,
    "shard_size": 4,
    "base": "-cell 70 80 90 75 85 95 -default_F 100 -N 5 -lambda 1.0 -distance 100 -pixel 0.4 -detpixels 32 "
            "-oversample 1",
    "vary": {"orientation": "uniform", "cell_jitter": 0.01, "Na": {"integers": [4, 7]},
             "wavelength": {"uniform": [0.98, 1.02]}, "distance": {"normal": [100, 1]},
             "beam_x": {"normal": [6.6, 0.05]}, "mosaic_spread": {"uniform": [0.05, 0.3]},
             "fluence": {"loguniform": ["1e27", "1e29"]}},
    "outputs": {"float": True, "counts": "uint16"},
}


def _validate(path):
    from nexusformat.nexus.validate import validate_application
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        warnings, errors = validate_application(str(path), path="/entry", application="NXmx")
    return errors, buf.getvalue()


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    d = tmp_path_factory.mktemp("ds")
    out = generate(SPEC, d / "set.h5", workers=0, progress=False)
    return d, out


def test_layout_validates_and_reads_back(made):
    d, out = made
    assert sorted(p.name for p in d.iterdir()) == ["set.h5", "set_shard00000.h5", "set_shard00001.h5",
                                                    "set_shard00002.h5"]
    pytest.importorskip("nexusformat")
    for f in sorted(d.iterdir()):
        errors, log = _validate(f)
        assert errors == 0, log
    with h5py.File(out, "r") as fh:
        data = fh["entry/data/data"]
        assert data.shape == (10, 32, 32) and data.dtype == np.uint16
        assert fh["entry/data/photons"].shape == (10, 32, 32)
        assert np.all(fh["entry/nbragg/completed"][()] == 1)
    with h5py.File(d / "set_shard00000.h5", "r") as fh:
        ds = fh["entry/data/data"]
        assert ds.chunks == (1, 32, 32) and (ds.compression or ds._filters)
    params, orient, spec = read_parameters(out)
    assert set(params) == {"cell_a", "cell_b", "cell_c", "Na", "wavelength", "distance", "beam_x",
                           "mosaic_spread", "fluence"}
    assert all(len(v) == 10 for v in params.values())
    assert orient.shape == (10, 3, 3) and np.allclose(orient[3] @ orient[3].T, np.eye(3))
    assert len(set(params["wavelength"])) == 10


def test_open_loads_the_filters_and_reads_frames(made, tmp_path):
    d, out = made
    with nbragg.dataset.open(out) as fh:
        assert np.array_equal(fh["entry/data/data"][4], read_frame(out, 4))
    with pytest.raises(DatasetError, match="does not exist"):
        nbragg.dataset.open(tmp_path / "nothere.h5")


def test_frames_resimulate_from_stored_parameters(made):
    d, out = made
    spec = load_spec(SPEC)
    base = base_experiment(spec)
    params, orient, _ = read_parameters(out)
    for i in (0, 5, 9):
        exp = frame_experiment(base, {k: v[i] for k, v in params.items()}, orient[i])
        img = nbragg.simulate(exp, warn=lambda m: None).image.astype(np.float32)
        assert np.array_equal(img, read_frame(out, i, "photons"))


def test_rerun_is_a_no_op_and_other_spec_is_refused(made, tmp_path):
    d, out = made
    before = read_frame(out, 2)
    generate(SPEC, out, workers=0, progress=False)
    assert np.array_equal(before, read_frame(out, 2))
    other = dict(SPEC, seed=8)
    with pytest.raises(DatasetError, match="different spec"):
        generate(other, out, workers=0, progress=False)


def _contents(path):
    with h5py.File(path, "r") as fh:
        return (fh["entry/data/data"][()], fh["entry/data/photons"][()],
                {k: fh["entry/nbragg"][k][()] for k in fh["entry/nbragg"] if k != "jacobian"})


def test_killed_runs_resume_to_the_same_file(tmp_path):
    # frames heavy enough (~0.1 s) that the kills land while frames are being computed
    spec = dict(SPEC, images=24, shard_size=5,
                base=SPEC["base"].replace("-detpixels 32", "-detpixels 96").replace("-oversample 1", "-oversample 3")
                + " -mosaic_dom 10")
    sp = tmp_path / "spec.json"
    sp.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))

    def cmd(out):
        return [sys.executable, "-m", "nbragg.dataset", str(sp), "-o", str(out), "--workers", "0", "--noprogress"]

    t0 = time.perf_counter()
    done = subprocess.run(cmd(tmp_path / "reference.h5"), env=env, capture_output=True)
    full = time.perf_counter() - t0
    assert done.returncode == 0, done.stderr.decode()
    reference = tmp_path / "reference.h5"
    out = tmp_path / "killed.h5"
    rng = np.random.default_rng(0)
    kills = 0
    for attempt in range(12):
        proc = subprocess.Popen(cmd(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            # early in the first attempts (start-up is ~1 s), anywhere later
            hi = 0.6 * full if kills < 3 else 1.5 * full
            proc.wait(timeout=float(rng.uniform(0.35 * full, hi)))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            continue
        assert proc.returncode == 0, proc.stderr.read().decode()
        break
    else:
        proc = subprocess.run(cmd(out), env=env, capture_output=True)
        assert proc.returncode == 0, proc.stderr.decode()
    assert kills >= 2
    a, b = _contents(reference), _contents(out)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    for k in a[2]:
        if k != "frame_index":
            assert np.array_equal(a[2][k], b[2][k], equal_nan=True), k
    assert not (tmp_path / "killed.parts").exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")]
    assert leftovers == []
    errors, log = _validate(out)
    assert errors == 0, log


def test_dask_workers_give_the_same_frames(tmp_path, made):
    pytest.importorskip("distributed")
    _, reference = made
    out = generate(SPEC, tmp_path / "dask.h5", workers=2, progress=False)
    a, b = _contents(reference), _contents(out)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_jacobian_output(tmp_path):
    spec = dict(SPEC, images=2, outputs={"float": True, "counts": "none", "jacobian": ["Na", "distance"]})
    generate(spec, tmp_path / "j.h5", workers=0, progress=False)
    with h5py.File(tmp_path / "j_shard00000.h5", "r") as fh:
        J = fh["entry/nbragg/jacobian/Na"][()]
        assert J.shape == (2, 32, 32) and np.any(J != 0)
        assert fh["entry/data/data"].dtype == np.float32


def test_frames_with_a_jacobian_have_the_same_images(monkeypatch):
    """A frame's Jacobian pass yields its image too (no second, forward pass), and it is
    simulate's image bit for bit in float64."""
    import sys
    from nbragg.dataset.frames import simulate_frame
    from nbragg.gradients import jacobian
    plain = load_spec(dict(SPEC, images=2, outputs={"float": True, "counts": "none"}))
    with_j = load_spec(dict(SPEC, images=2, outputs={"float": True, "counts": "none", "jacobian": ["Na", "distance"]}))
    base = base_experiment(plain)
    for i in range(2):
        a = simulate_frame(plain, i)
        with monkeypatch.context() as mp:
            mp.setattr(sys.modules["nbragg.engine"], "simulate", lambda *x, **k: pytest.fail("a forward pass ran"))
            b = simulate_frame(with_j, i)
        assert "jacobian" in b and np.any(b["photons"] > 0)
        np.testing.assert_array_equal(a["photons"], b["photons"])
        from nbragg.dataset import frame_parameters
        exp = frame_experiment(base, *frame_parameters(plain, base, i))
        np.testing.assert_array_equal(jacobian(exp, ["Na"], return_image=True)[1],
                                      nbragg.simulate(exp, warn=lambda m: None).image)


@pytest.mark.parametrize("change,needle", [
    ({"images": 0}, "images"),
    ({"vary": {"cell_q": 1}}, "cell_q"),
    ({"vary": {"Na": {"uniform": [5]}}}, "two numbers"),
    ({"vary": {"Na": {"gamma": [1, 2]}}}, "gamma"),
    ({"outputs": {"counts": "int8"}}, "counts"),
    ({"colour": "blue"}, "colour"),
    ({"base": ""}, "base"),
    ({"precision": "half"}, "precision"),
])
def test_spec_errors_name_the_field(change, needle):
    with pytest.raises(DatasetError, match=needle):
        load_spec(dict(SPEC, **change))


def test_command_line_errors(tmp_path, capsys):
    from nbragg.dataset import main
    assert main([str(tmp_path / "missing.yaml"), "-o", str(tmp_path / "x.h5")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    sp = tmp_path / "s.json"
    sp.write_text(json.dumps(SPEC))
    assert main([str(sp), "-o", str(tmp_path / "nodir" / "x.h5"), "--workers", "0"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_float32_frames_and_identity(tmp_path, made):
    """precision: float32 makes frames close to the float64 ones, and is a different dataset."""
    _, reference = made
    spec = dict(SPEC, images=2, precision="float32")
    out = generate(spec, tmp_path / "f32.h5", workers=0, progress=False)
    a, b = read_frame(reference, 1, "photons"), read_frame(out, 1, "photons")
    assert np.abs(a - b).max() <= 1e-4 * a.max() and not np.array_equal(a, b)
    assert load_spec(spec).digest() != load_spec(dict(SPEC, images=2)).digest()
    assert load_spec(dict(SPEC, precision="float64")).digest() == load_spec(SPEC).digest()


def test_gpu_backend_runs_in_process(tmp_path):
    pytest.importorskip("numba_cuda")
    with pytest.raises(DatasetError, match="--workers 0 or 1"):
        generate(dict(SPEC, images=2), tmp_path / "g.h5", workers=2, backend="cuda", progress=False)


def test_shipped_example_spec_loads():
    spec = load_spec(ROOT / "data" / "example_dataset.yaml")
    assert spec.images == 8 and "orientation" in spec.vary
    base_experiment(spec)


RESPONSE = {"psf": "gauss", "psf_fwhm": {"uniform": [50.0, 150.0]}, "gain": 2.0, "adc": 10.0,
            "readout": {"uniform": [1.0, 3.0]}, "calibration": 0.02}


def test_a_response_makes_the_counts_detector_pixels_and_can_be_redone(tmp_path):
    """With a response the stored counts are pixel values (noise, PSF, gain, offset,
    read-out), the photons stay the noiseless target, the drawn response numbers are in
    the parameter table, and a frame can be made again from what the file holds."""
    spec = dict(SPEC, images=3, shard_size=2, response=RESPONSE)
    out = generate(spec, tmp_path / "r.h5", workers=0, progress=False)
    params, orient, stored_spec = read_parameters(out)
    assert {"response_psf_fwhm", "response_readout"} <= set(params)
    assert np.all((params["response_psf_fwhm"] >= 50) & (params["response_psf_fwhm"] <= 150))
    assert stored_spec["response"]["gain"] == 2.0
    # the experiments' draws do not change when a response is added
    plain, _, _ = read_parameters(generate(dict(SPEC, images=3, shard_size=2), tmp_path / "p.h5", workers=0,
                                           progress=False))
    for name in plain:
        np.testing.assert_array_equal(plain[name], params[name])
    from nbragg.dataset import frame_response
    from nbragg.response import respond
    s = load_spec(spec)
    base = base_experiment(s)
    for i in range(3):
        values = {k: v[i] for k, v in params.items()}
        exp = frame_experiment(base, values, orient[i])
        photons = nbragg.simulate(exp, warn=lambda m: None).image
        np.testing.assert_array_equal(read_frame(out, i, "photons"), photons.astype(np.float32))
        response, _ = frame_response(s, values, i)
        assert response.psf_fwhm == values["response_psf_fwhm"] and response.bits == 16
        adu = read_frame(out, i)
        assert adu.dtype == np.uint16
        np.testing.assert_array_equal(adu, respond(photons, response, exp.detector.pixel_size).adu)
        assert adu.mean() > 10.0 and not np.array_equal(adu, np.rint(10.0 + 2.0 * photons))   # noise and blur


@pytest.mark.parametrize("change,needle", [
    ({"response": {"colour": 1}}, "response.colour"),
    ({"response": {"bits": 32}}, "response.bits"),
    ({"response": {"psf": "airy", "psf_fwhm": 10}}, "response"),
    ({"response": {"gain": {"jitter": 0.1}}}, "response.gain"),
    ({"response": {"readout": {"uniform": [3, 1]}}}, "response.readout"),
    ({"response": {"gain": 1.0}, "outputs": {"float": True, "counts": "none"}}, "outputs.counts"),
])
def test_response_spec_errors_name_the_field(change, needle):
    with pytest.raises(DatasetError, match=needle.replace(".", r"\.")):
        load_spec(dict(SPEC, **change))


BACKGROUND = [{"table": "water", "thickness": {"uniform": [0.001, 0.003]}, "scale": {"loguniform": [1e-9, 1e-8]}},
              {"table": "air", "thickness": 20.0, "scale": 1e-9}]


def test_background_materials_vary_per_frame_and_can_be_redone(tmp_path):
    """Background materials in the spec: their drawn thickness and scale are parameters of
    the table (background_thickness_0, background_scale_0), the experiments' draws do not
    change, and each frame's photons are those of the experiment the table describes."""
    spec = dict(SPEC, images=3, shard_size=2, background=BACKGROUND)
    out = generate(spec, tmp_path / "b.h5", workers=0, progress=False)
    params, orient, stored_spec = read_parameters(out)
    assert {"background_thickness_0", "background_scale_0"} <= set(params)
    assert "background_thickness_1" not in params
    assert np.all((params["background_thickness_0"] >= 0.001) & (params["background_thickness_0"] <= 0.003))
    assert stored_spec["background"][1]["table"] == "air"
    plain, _, _ = read_parameters(generate(dict(SPEC, images=3, shard_size=2), tmp_path / "p.h5", workers=0,
                                           progress=False))
    for name in plain:
        np.testing.assert_array_equal(plain[name], params[name])
    base = base_experiment(load_spec(spec))
    without = []
    for i in range(3):
        values = {k: v[i] for k, v in params.items()}
        exp = frame_experiment(base, values, orient[i])
        assert exp.background[0].thickness == values["background_thickness_0"]
        photons = nbragg.simulate(exp, warn=lambda m: None).image
        np.testing.assert_array_equal(read_frame(out, i, "photons"), photons.astype(np.float32))
        without.append(nbragg.simulate(exp.replace(background=()), warn=lambda m: None).image)
    assert np.all(read_frame(out, 0, "photons") > without[0].astype(np.float32))


@pytest.mark.parametrize("change,needle", [
    ({"background": [{"colour": 1}]}, "background[0].colour"),
    ({"background": [{"table": "nosuch.stol"}]}, "background[0]"),
    ({"background": [{"thickness": {"jitter": 0.1}}]}, "background[0].thickness"),
    ({"background": 3}, "background must be a list"),
    ({"background": [{"molecules": {"uniform": [1e15, 1e16]}}]}, "background[0].molecules"),
])
def test_background_spec_errors_name_the_field(change, needle):
    with pytest.raises(DatasetError, match=re.escape(needle)):
        load_spec(dict(SPEC, **change))


def test_background_spec_numbers_and_inline_tables():
    """Numbers as YAML may leave them (1e16 is text to PyYAML) and a table given inline."""
    spec = load_spec(dict(SPEC, background=[{"table": [[0.0, 2.6], [0.1, 2.0], [0.5, 3.0]], "molecules": "1e16",
                                              "width": "0.05"}]))
    assert spec.background[0]["molecules"] == 1e16 and len(spec.digest()) == 16
    assert base_experiment(spec).background[0].molecules == 1e16
