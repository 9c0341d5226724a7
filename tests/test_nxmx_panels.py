"""NXmx files of multi-panel detectors, read back with h5py alone: each module's
depends_on chain resolved by hand must land its pixels where the kernels put them.
Also the command line's -nxmx file and its per-panel nanoBragg outputs."""

import contextlib
import importlib.util
import io
import types

import h5py
import numpy as np
import pytest

import nbragg
from nbragg import cli
from nbragg.engine import build_model
from nbragg.io.nexus import module_names, write_nxmx, write_nxmx_file
from nbragg.io.smv import read_smv
from nbragg.noise import c_noise_image

ARGS = ("-cell 70 80 90 75 85 95 -misset 10 5 3 -default_F 100 -N 5 -lambda 1.0 -distance 100 -pixel 0.4 "
        "-detpixels 12 -oversample 1 -polar 0.3")
PIXEL = 0.4
FAST, SLOW = 6, 4


def _exp(args=ARGS):
    return nbragg.Experiment.from_nanobragg_args(args.split(), warn=lambda m: None)


def _panels(count=4, **kw):
    """Small panels around the beam (mosflm: beam along x), each turned its own way."""
    turns = [(0.0, 0.0, 0.0), (3.0, 0.0, 0.0), (0.0, -4.0, 2.0), (5.0, 2.5, -7.0)]
    out = []
    for k in range(count):
        out.append(nbragg.Panel(
            origin=(100.0 + 0.5 * k, 2.0 - 2.0 * (k % 2), -2.5 + 2.6 * (k // 2)), fast_axis=(0.0, 0.0, 1.0),
            slow_axis=(0.0, -1.0, 0.0), image_size=(FAST, SLOW), pixel_size=PIXEL, name=f"p{k}",
            rotation=turns[k % len(turns)], mask=((1, 0, 3, 2),) if k == 2 else (), **kw))
    return out


def _multi(count=4):
    exp = _exp()
    return exp.replace(detector=exp.detector.replace(panels=_panels(count)))


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    exp = _multi()
    r = nbragg.simulate(exp, warn=lambda m: None)
    path = tmp_path_factory.mktemp("nx") / "four.h5"
    write_nxmx_file(path, r.model, r.image)
    return r, path


# ---- a NeXus reader in a few lines: h5py and numpy only

_LENGTH = {"mm": 1.0, "m": 1000.0, "um": 1e-3, "cm": 10.0}
_ANGLE = {"deg": np.pi / 180.0, "degree": np.pi / 180.0, "degrees": np.pi / 180.0, "rad": 1.0}


def _text(v):
    return v.decode() if isinstance(v, bytes) else str(v)


def _rotation(axis, angle):
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    K = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(angle) * K + (1 - np.cos(angle)) * K @ K


def _matrix(ds):
    """The 4x4 matrix of one NXtransformations axis (its first value), in mm."""
    kind = _text(ds.attrs["transformation_type"])
    units = _text(ds.attrs["units"])
    value = float(np.atleast_1d(ds[()])[0])
    vector = np.asarray(ds.attrs["vector"], float)
    offset = np.zeros(3)
    if "offset" in ds.attrs:
        offset = np.asarray(ds.attrs["offset"], float) * _LENGTH[_text(ds.attrs["offset_units"])]
    T = np.eye(4)
    if kind == "translation":
        T[:3, 3] = value * _LENGTH[units] * vector + offset
    elif kind == "rotation":
        T[:3, :3] = _rotation(vector, value * _ANGLE[units])
        T[:3, 3] = offset
    else:
        raise AssertionError(f"{ds.name}: transformation_type {kind!r}")
    return T


def _chain(fh, path):
    """The product of the transformations from ``path`` down the depends_on chain to '.'."""
    T = np.eye(4)
    seen = []
    while path != ".":
        assert path not in seen, f"depends_on loop at {path}"
        seen.append(path)
        ds = fh[path]
        T = _matrix(ds) @ T
        path = _text(ds.attrs["depends_on"])
    return T, seen


def _module_geometry(fh, module):
    """(first pixel's outer corner, fast, slow) of a module, McStas frame, mm."""
    fast_ds, slow_ds = module["fast_pixel_direction"], module["slow_pixel_direction"]
    assert _text(fast_ds.attrs["depends_on"]) == _text(slow_ds.attrs["depends_on"])
    A, chain = _chain(fh, _text(fast_ds.attrs["depends_on"]))
    corner = A @ np.append(np.asarray(fast_ds.attrs.get("offset", np.zeros(3)), float), 1.0)
    fast = A[:3, :3] @ np.asarray(fast_ds.attrs["vector"], float)
    slow = A[:3, :3] @ np.asarray(slow_ds.attrs["vector"], float)
    return corner[:3], fast, slow, chain


def _mcstas(model):
    """Lab -> McStas, built here from the beam and polarization: z along the beam, x the
    polarization off the beam, y = z x x."""
    z = np.asarray(model.detector.beam, float)
    x = np.asarray(model.detector.polar, float)
    x = x - z * (x @ z)
    x /= np.linalg.norm(x)
    return np.array([x, np.cross(z, x), z])


def _validate(path):
    from nexusformat.nexus.validate import validate_application
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        warnings, errors = validate_application(str(path), path="/entry", application="NXmx")
    return errors, buf.getvalue()


# ---- the geometry

def test_panels_differ_in_orientation(four):
    r, _ = four
    normals = [np.cross(np.real(p.fdet), np.real(p.sdet)) for p in r.model.panels]
    assert len(r.model.panels) == 4 and r.image.shape == (4, SLOW, FAST)
    assert min(np.degrees(np.arccos(np.clip(a @ b, -1, 1))) for i, a in enumerate(normals)
               for b in normals[i + 1:]) > 1.0


def test_each_module_chain_lands_on_its_panel(four):
    r, path = four
    M = _mcstas(r.model)
    assert np.allclose(M @ M.T, np.eye(3)) and np.linalg.det(M) == pytest.approx(1.0)
    with h5py.File(path, "r") as fh:
        det = fh["entry/instrument/detector"]
        assert _text(det.attrs["NX_class"]) == "NXdetector"
        modules = [g for g in det.values() if _text(g.attrs.get("NX_class", "")) == "NXdetector_module"]
        assert [g.name.rsplit("/", 1)[1] for g in modules] == ["module_0", "module_1", "module_2", "module_3"]
        for k, (mod, panel) in enumerate(zip(modules, r.model.panels)):
            corner, fast, slow, chain = _module_geometry(fh, mod)
            # the module's offset, then the detector's own transformation, then the sample
            assert chain == [mod.name + "/module_offset", det.name + "/transformations/origin"]
            assert _text(det["depends_on"][()]) == chain[-1]
            # back to nbragg's laboratory frame with the same rotation
            np.testing.assert_allclose(M.T @ corner, np.real(panel.pix0) * 1000.0, rtol=0, atol=1e-9)
            np.testing.assert_allclose(M.T @ fast, np.real(panel.fdet), rtol=0, atol=1e-12)
            np.testing.assert_allclose(M.T @ slow, np.real(panel.sdet), rtol=0, atol=1e-12)
            for name in ("fast_pixel_direction", "slow_pixel_direction"):
                assert mod[name][()] * _LENGTH[_text(mod[name].attrs["units"])] == pytest.approx(PIXEL)
            assert list(mod["data_origin"][()]) == [k, 0, 0]
            assert list(mod["data_size"][()]) == [1, SLOW, FAST]


def test_last_pixel_lands_where_the_kernel_puts_it(four):
    # a pixel's far corner = corner + F pixels along fast + S along slow, in mm
    r, path = four
    M = _mcstas(r.model)
    with h5py.File(path, "r") as fh:
        mod = fh["entry/instrument/detector/module_3"]
        corner, fast, slow, _ = _module_geometry(fh, mod)
        far = corner + FAST * mod["fast_pixel_direction"][0] * fast + SLOW * mod["slow_pixel_direction"][0] * slow
    p = r.model.panels[3]
    expect = (np.real(p.pix0) + FAST * p.pixel * np.real(p.fdet) + SLOW * p.pixel * np.real(p.sdet)) * 1000.0
    np.testing.assert_allclose(M.T @ far, expect, rtol=0, atol=1e-9)


def test_data_and_mask_slice_per_module(four):
    r, path = four
    with h5py.File(path, "r") as fh:
        data = fh["entry/data/data"]
        assert data.shape == (1, 4, SLOW, FAST) and data.dtype == np.float32
        det = fh["entry/instrument/detector"]
        assert det["data"].shape == data.shape     # the same data, linked
        mask = det["pixel_mask"][()]
        assert mask.shape == (4, SLOW, FAST) and mask.dtype == np.int32
        for k in range(4):
            mod = det[f"module_{k}"]
            sl = tuple(slice(o, o + n) for o, n in zip(mod["data_origin"][()], mod["data_size"][()]))
            np.testing.assert_array_equal(data[0][sl].reshape(SLOW, FAST), r.image[k].astype(np.float32))
            m = mask[sl].reshape(SLOW, FAST)
            if k == 2:    # rectangle (f0, s0, f1, s1) = (1, 0, 3, 2): slow 0-1, fast 1-2
                expect = np.zeros((SLOW, FAST), np.int32)
                expect[0:2, 1:3] = 1
                np.testing.assert_array_equal(m, expect)
            else:
                assert not m.any()


def test_multi_panel_file_validates(four):
    pytest.importorskip("nexusformat")
    errors, log = _validate(four[1])
    assert errors == 0, log


def test_module_names_sort_in_panel_order(tmp_path):
    # readers list an HDF5 group's members by name: module_10 must not come before module_2
    assert module_names(1) == ["module"]
    assert module_names(4) == ["module_0", "module_1", "module_2", "module_3"]
    assert module_names(12)[:3] == ["module_00", "module_01", "module_02"] and module_names(12)[-1] == "module_11"
    exp = _exp()
    panels = [nbragg.Panel(origin=(100.0, 3.0 - 0.5 * k, -1.0), fast_axis=(0, 0, 1), slow_axis=(0, -1, 0),
                           image_size=(2, 2), pixel_size=0.1) for k in range(12)]
    model = build_model(exp.replace(detector=exp.detector.replace(panels=panels)), warn=lambda m: None)
    with h5py.File(tmp_path / "twelve.h5", "w") as fh:
        entry = fh.create_group("entry")
        entry.create_group("data").create_dataset("data", data=np.zeros((1, 12, 2, 2), np.float32))
        write_nxmx(entry, model, 1)
        det = fh["entry/instrument/detector"]
        origins = [int(g["data_origin"][0]) for g in det.values()
                   if _text(g.attrs.get("NX_class", "")) == "NXdetector_module"]
    assert origins == list(range(12))


def test_image_of_the_wrong_shape_is_refused(four, tmp_path):
    r, _ = four
    with pytest.raises(ValueError, match="does not match"):
        write_nxmx_file(tmp_path / "x.h5", r.model, r.image[0])
    assert list(tmp_path.iterdir()) == []


# ---- one panel: the command line's -nxmx

def test_cli_nxmx_one_panel(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ARGS.split() + ["-noprogress"]
    out = io.StringIO()
    assert cli.run(base + ["-nxmx", "one.h5"], stdout=out, stderr=io.StringIO()) == 0
    assert "writing one.h5 as NXmx" in out.getvalue()
    written = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(written) == ["floatimage.bin", "image.pgm", "intimage.img", "noiseimage.img", "one.h5"]
    photons = np.frombuffer(written["floatimage.bin"], dtype="<f4").reshape(12, 12)
    model = build_model(_exp(), warn=lambda m: None)
    M = _mcstas(model)
    with h5py.File(tmp_path / "one.h5", "r") as fh:
        data = fh["entry/data/data"]
        assert data.shape == (1, 12, 12) and data.dtype == np.float32
        np.testing.assert_array_equal(data[0], photons)
        det = fh["entry/instrument/detector"]
        assert det["pixel_mask"].shape == (12, 12)
        mod = det["module"]
        assert list(mod["data_origin"][()]) == [0, 0] and list(mod["data_size"][()]) == [12, 12]
        corner, fast, slow, _ = _module_geometry(fh, mod)
    np.testing.assert_allclose(M.T @ corner, model.detector.pix0 * 1000.0, rtol=0, atol=1e-9)
    np.testing.assert_allclose(M.T @ fast, model.detector.fdet, atol=1e-12)
    np.testing.assert_allclose(M.T @ slow, model.detector.sdet, atol=1e-12)
    if importlib.util.find_spec("nexusformat") is not None:
        errors, log = _validate(tmp_path / "one.h5")
        assert errors == 0, log
    # the other files are those of a run without -nxmx
    other = tmp_path / "plain"
    other.mkdir()
    monkeypatch.chdir(other)
    assert cli.run(base, stdout=io.StringIO(), stderr=io.StringIO()) == 0
    for name in ("floatimage.bin", "image.pgm", "intimage.img", "noiseimage.img"):
        assert (other / name).read_bytes() == written[name], name


def test_cli_nxmx_into_a_missing_folder_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(ARGS.split() + ["-noprogress", "-nxmx", "nowhere/x.h5"]) == 2
    err = capsys.readouterr().err
    assert "-nxmx" in err and "does not exist" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


# ---- several panels: nanoBragg's outputs one file per panel

def test_panel_paths():
    assert cli.panel_paths("float.bin", 1) == ["float.bin"]
    assert cli.panel_paths("float.bin", 4) == ["float_0.bin", "float_1.bin", "float_2.bin", "float_3.bin"]
    names = cli.panel_paths("out/float.bin", 64)
    assert names[0] == "out/float_00.bin" and names[63] == "out/float_63.bin" and len(set(names)) == 64
    assert cli.panel_paths("a.b/noise", 11)[10] == "a.b/noise_10"


def test_per_panel_outputs(four, tmp_path):
    r, _ = four
    f32 = r.image.astype(np.float32)
    o = types.SimpleNamespace(floatfile=str(tmp_path / "float.bin"), intfile=str(tmp_path / "int.img"),
                              pgmfile=str(tmp_path / "image.pgm"), noisefile=str(tmp_path / "noise.img"),
                              write_pgm=True, calculate_noise=True, intfile_scale=0.0, pgm_scale=0.0,
                              adc_offset=40.0, seed=-1234)
    lines = []
    stats = nbragg.engine.compute_stats(r.model, f32.astype(np.float64), 0.0)
    cli.write_images(r.model, r.model.experiment, f32, stats, o, lines.append)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{s}_{k}{e}" for s, e in (("float", ".bin"), ("int", ".img"), ("image", ".pgm"), ("noise", ".img"))
        for k in range(4))
    assert sum("writing" in line for line in lines) == 16
    noises = []
    for k, panel in enumerate(r.model.panels):
        raw = (tmp_path / f"float_{k}.bin").read_bytes()
        np.testing.assert_array_equal(np.frombuffer(raw, "<f4").reshape(SLOW, FAST), f32[k])
        for name in ("int", "noise"):
            smv = read_smv(tmp_path / f"{name}_{k}.img")
            assert smv.data.shape == (SLOW, FAST)
            head = dict(line.split("=", 1) for line in smv.header.replace(";", "").split("\n") if "=" in line)
            assert (int(head["SIZE1"]), int(head["SIZE2"])) == (FAST, SLOW)
            # each panel's own distance along the beam (mm)
            beam = np.asarray(r.model.detector.beam)
            normal = np.real(panel.odet)
            distance = (np.real(panel.pix0) @ normal) / (beam @ normal) * 1000.0
            assert float(head["DISTANCE"]) == pytest.approx(distance, abs=1e-3)
        noises.append(read_smv(tmp_path / f"noise_{k}.img").data)
        pgm = (tmp_path / f"image_{k}.pgm").read_bytes()
        assert pgm.startswith(b"P5") and len(pgm) > SLOW * FAST
    distances = {float(dict(x.split("=", 1) for x in read_smv(tmp_path / f"int_{k}.img").header
                            .replace(";", "").split("\n") if "=" in x)["DISTANCE"]) for k in range(4)}
    assert len(distances) == 4


def test_panel_noise_draws_through_the_panels():
    """Rows of one panel cut into panels give, panel after panel, nanoBragg's noise image
    of the one panel (one generator, scan order); one panel gives c_noise_image's."""
    rng = np.random.default_rng(5)
    img = rng.uniform(0, 50, (12, 7)).astype(np.float32)
    roi = (0, 6, 0, 11)
    whole, total, over = c_noise_image(img, roi, -77, 40.0)
    one, t1, o1 = cli.panel_noise([img], [roi], -77, 40.0)
    assert np.array_equal(one[0], whole) and (t1, o1) == (total, over)
    parts, t3, o3 = cli.panel_noise(list(img.reshape(3, 4, 7)), [(0, 6, 0, 3)] * 3, -77, 40.0)
    assert np.array_equal(np.concatenate(parts), whole) and t3 == pytest.approx(total) and o3 == over
    assert not np.array_equal(parts[0], parts[1])
