"""Streaming frames: generators over a spec and over written shards, and the PyTorch
IterableDataset, whose frames do not depend on the number of DataLoader workers."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from nbragg.dataset import DatasetError, generate, load_spec, read_frame, read_parameters
from nbragg.dataset.stream import frames_from_files, frames_from_spec
from nbragg.errors import NbraggError

ROOT = Path(__file__).resolve().parents[1]

SPEC = {
    "seed": 11,
    "images": 6,
    "shard_size": 4,
    "base": "-cell 70 80 90 75 85 95 -default_F 100 -N 5 -lambda 1.0 -distance 100 -pixel 0.4 -detpixels 32 "
            "-oversample 1",
    "vary": {"orientation": "uniform", "cell_jitter": 0.01, "Na": {"integers": [4, 7]},
             "wavelength": {"uniform": [0.98, 1.02]}, "fluence": {"loguniform": ["1e27", "1e29"]}},
    "outputs": {"float": True, "counts": "uint16", "jacobian": ["Na"]},
}
ALL = ("data", "photons", "jacobian")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    return Path(generate(SPEC, d / "set.h5", workers=0, progress=False))


def _assert_same(a, b):
    """Two frames (dicts of numpy arrays, numbers and dicts) equal bit for bit, same dtypes."""
    assert list(a) == list(b)
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, dict):
            assert list(x) == list(y), k
            for n in x:
                _assert_same({n: x[n]}, {n: y[n]})
        elif isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and x.shape == y.shape, k
            assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), k     # NaN: a spot off the detector
        else:
            assert x == y and type(x) is type(y), k


def test_spec_generator_gives_the_written_frames(made):
    params, orient, _ = read_parameters(made)
    frames = list(frames_from_spec(SPEC, keys=ALL))
    assert [f["index"] for f in frames] == list(range(6))
    names = load_spec(SPEC).varied_names()
    for f in frames:
        i = f["index"]
        assert f["image"].dtype == np.uint16 and np.array_equal(f["image"], read_frame(made, i))
        assert f["photons"].dtype == np.float32 and np.array_equal(f["photons"], read_frame(made, i, "photons"))
        assert list(f["params"]) == names
        assert all(f["params"][n] == params[n][i] for n in names)
        assert np.array_equal(f["orientation"], orient[i])
        with h5py.File(made.parent / f"set_shard{i // 4:05d}.h5", "r") as fh:
            assert np.array_equal(f["jacobian"][0], fh["entry/nbragg/jacobian/Na"][i % 4])
    assert len({f["params"]["wavelength"] for f in frames}) == 6


def test_file_generator_gives_the_same_frames(made):
    expected = list(frames_from_spec(SPEC, keys=ALL))
    from_master = list(frames_from_files(made, keys=ALL))
    shards = sorted(made.parent.glob("set_shard*.h5"), reverse=True)     # any order in, index order out
    from_shards = list(frames_from_files(shards, keys=ALL))
    assert len(from_master) == len(from_shards) == 6
    assert [f["index"] for f in frames_from_files([made, shards[-1]])] == list(range(6))   # the same shard twice
    for e, a, b in zip(expected, from_master, from_shards):
        _assert_same(e, a)
        _assert_same(e, b)
    # a range crossing the shards, from both sources; the default keys give the stored image
    part = list(frames_from_files(made, start=2, stop=5))
    assert [f["index"] for f in part] == [2, 3, 4]
    assert list(part[0]) == ["index", "image", "params", "orientation"]
    for a, b in zip(part, frames_from_spec(SPEC, start=2, stop=5)):
        _assert_same(a, b)
    assert list(frames_from_files(made, start=3, stop=3)) == []


def test_frames_not_completed_are_skipped(made, tmp_path):
    for p in made.parent.glob("set*.h5"):
        shutil.copy(p, tmp_path / p.name)
    with h5py.File(tmp_path / "set_shard00000.h5", "r+") as fh:
        fh["entry/nbragg/completed"][1] = 0
    assert [f["index"] for f in frames_from_files(tmp_path / "set.h5")] == [0, 2, 3, 4, 5]
    # a master stands for the shards beside it; a missing shard's frames are not there
    os.unlink(tmp_path / "set_shard00001.h5")
    assert [f["index"] for f in frames_from_files(tmp_path / "set.h5")] == [0, 2, 3]


def _with_labels(made, tmp_path):
    """A copy of the dataset whose shards hold two more per-frame datasets."""
    for p in made.parent.glob("set*.h5"):
        shutil.copy(p, tmp_path / p.name)
    for k, n in ((0, 4), (1, 2)):
        with h5py.File(tmp_path / f"set_shard{k:05d}.h5", "r+") as fh:
            nb = fh["entry/nbragg"]
            nb.create_dataset("spots", data=np.arange(n, dtype=np.int32) + 4 * k)
            nb.create_dataset("labels/mask", data=np.ones((n, 32, 32), dtype=bool))
    return tmp_path / "set.h5"


def test_label_datasets_are_yielded(made, tmp_path):
    frames = list(frames_from_files(_with_labels(made, tmp_path)))
    assert [sorted(f["labels"]) for f in frames] == [["labels/mask", "spots"]] * 6
    assert [int(f["labels"]["spots"]) for f in frames] == list(range(6))
    mask = frames[5]["labels"]["labels/mask"]
    assert mask.shape == (32, 32) and mask.dtype == bool and mask.all()


def test_bad_input_is_one_clear_error(made, tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as fh:
        fh.create_dataset("entry/data/data", data=np.zeros((1, 2, 2)))
    cases = [
        (lambda: frames_from_files(tmp_path / "missing.h5"), "does not exist"),
        (lambda: frames_from_files(tmp_path), "is a folder"),
        (lambda: frames_from_files(text), "not an nbragg dataset"),
        (lambda: frames_from_files(other), "not an nbragg dataset"),
        (lambda: frames_from_files([]), "no dataset files"),
        (lambda: frames_from_files(made, start=-1), "start = -1"),
        (lambda: frames_from_files(made, start=1.5), "start = 1.5"),
        (lambda: frames_from_files(made, stop=7), "beyond the dataset's 6 frames"),
        (lambda: frames_from_files(made, start=4, stop=2), "after stop"),
        (lambda: frames_from_files(made, keys=("nope",)), "no per-frame 'nope'"),
        (lambda: frames_from_spec(SPEC, stop=9), "beyond"),
        (lambda: frames_from_spec(dict(SPEC, outputs={"counts": "none"}), keys=("photons",)), "'photons'"),
        (lambda: frames_from_spec(3), "dataset spec"),
        (lambda: frames_from_spec(tmp_path / "nospec.yaml"), "nospec.yaml"),
    ]
    for call, needle in cases:
        with pytest.raises(NbraggError, match=needle):
            call()
    different = generate(dict(SPEC, seed=12, images=1, outputs={"counts": "uint16"}), tmp_path / "b.h5",
                         workers=0, progress=False)
    with pytest.raises(DatasetError, match="different dataset specs"):
        frames_from_files([made, different])


def test_generators_do_not_import_torch(made):
    code = textwrap.dedent(f"""
        import sys
        from nbragg.dataset.stream import frames_from_files
        assert len(list(frames_from_files({str(made)!r}))) == 6
        assert "torch" not in sys.modules
    """)
    done = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))


# -- PyTorch -------------------------------------------------------------------------------

def _loader(source, workers, **kw):
    torch = pytest.importorskip("torch")
    from nbragg.dataset.stream import FrameDataset
    ds = FrameDataset(source, **kw)
    # this process has run Numba's threads (workers that simulate must be spawned) and may
    # hold JAX's threads from other tests (a fork beside them can deadlock): spawn always
    ctx = "spawn" if workers else None
    return ds, list(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers,
                                                multiprocessing_context=ctx))


def _as_numpy(item):
    out = {}
    for k, v in item.items():
        out[k] = {n: a.numpy() for n, a in v.items()} if isinstance(v, dict) else (
            v.numpy() if hasattr(v, "numpy") else v)
    return out


@pytest.mark.parametrize("kind", ["spec", "files"])
def test_loader_gives_the_same_frames_for_0_1_2_workers(made, kind):
    torch = pytest.importorskip("torch")
    source = SPEC if kind == "spec" else str(made)
    expected = list(frames_from_spec(SPEC))
    names = load_spec(SPEC).varied_names()
    for workers in (0, 1, 2):
        ds, items = _loader(source, workers)
        assert len(ds) == 6 and ds.param_names == names
        # each frame once; with the DataLoader's in-order delivery, in the same order too
        assert [int(it["index"]) for it in items] == list(range(6))
        for it, e in zip(sorted(items, key=lambda it: int(it["index"])), expected):
            assert it["image"].dtype == torch.uint16 and it["params"].dtype == torch.float64
            got = _as_numpy(it)
            assert np.array_equal(got["image"], e["image"]) and np.array_equal(got["orientation"], e["orientation"])
            assert got["params"].tolist() == [e["params"][n] for n in names]


def test_shuffled_order_is_one_permutation_whatever_the_workers(made):
    pytest.importorskip("torch")
    orders = {}
    for workers in (0, 1, 2):
        ds, items = _loader(str(made), workers, shuffle_seed=5)
        orders[workers] = [int(it["index"]) for it in items]
        assert orders[workers] == list(ds.order())
    assert orders[0] == orders[1] == orders[2]
    assert sorted(orders[0]) == list(range(6)) and orders[0] != list(range(6))
    from nbragg.dataset.stream import FrameDataset
    ds = FrameDataset(str(made), shuffle_seed=5)
    ds.set_epoch(1)
    assert sorted(ds.order()) == list(range(6)) and list(ds.order()) != orders[0]
    with pytest.raises(DatasetError, match="epoch"):
        ds.set_epoch(-1)
    for bad in ({"shuffle_seed": -1}, {"threads": 0}, {"transform": 3}):
        with pytest.raises(DatasetError, match=next(iter(bad))):
            FrameDataset(str(made), **bad)
    # simulated on the fly: the same shuffled frames as read from the files
    _, simulated = _loader(SPEC, 2, shuffle_seed=5, start=1)
    _, read = _loader(str(made), 0, shuffle_seed=5, start=1)
    assert [int(it["index"]) for it in simulated] == [int(it["index"]) for it in read]
    for a, b in zip(simulated, read):
        a, b = _as_numpy(a), _as_numpy(b)
        assert all(np.array_equal(a[k], b[k]) for k in ("image", "params", "orientation"))


def test_loader_items_with_photons_jacobian_and_labels(made, tmp_path):
    torch = pytest.importorskip("torch")
    _, items = _loader(str(_with_labels(made, tmp_path)), 2, keys=ALL, stop=5)
    assert [int(it["index"]) for it in items] == list(range(5))
    it = items[4]
    assert it["photons"].dtype == torch.float32 and tuple(it["jacobian"].shape) == (1, 32, 32)
    assert int(it["labels"]["spots"]) == 4 and it["labels"]["labels/mask"].dtype == torch.bool
    # batches collate as usual
    from nbragg.dataset.stream import FrameDataset
    batch = next(iter(torch.utils.data.DataLoader(FrameDataset(str(made)), batch_size=4)))
    assert tuple(batch["image"].shape) == (4, 32, 32) and batch["index"].tolist() == [0, 1, 2, 3]


def test_forked_workers_simulate_when_the_parent_has_not(made):
    """The default (fork) start works from a parent that has not run Numba's threads."""
    pytest.importorskip("torch")
    code = textwrap.dedent(f"""
        import json, torch
        from nbragg.dataset.stream import FrameDataset
        spec = json.loads({repr(__import__("json").dumps(SPEC))})
        items = list(torch.utils.data.DataLoader(FrameDataset(spec), batch_size=None, num_workers=2))
        print(json.dumps([[int(it["index"]), int(it["image"].sum())] for it in items]))
    """)
    done = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    import json
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got == [[f["index"], int(f["image"].sum())] for f in frames_from_spec(SPEC)]


def test_forked_workers_after_openmp_say_what_to_do():
    """In a process of its own (forking beside other tests' JAX threads could deadlock):
    after a simulation, forked workers stop with the advice to spawn."""
    pytest.importorskip("torch")
    code = textwrap.dedent(f"""
        import json, sys, torch
        from nbragg.dataset import DatasetError
        from nbragg.dataset.stream import FrameDataset, _gnu_openmp_started, frames_from_spec
        spec = json.loads({repr(__import__("json").dumps(SPEC))})
        next(frames_from_spec(spec, stop=1))
        if not _gnu_openmp_started():
            print("SKIP"); sys.exit(0)
        loader = torch.utils.data.DataLoader(FrameDataset(spec), batch_size=None, num_workers=1,
                                             multiprocessing_context="fork")
        try:
            list(loader)
        except DatasetError as exc:
            print("ERROR", exc)
    """)
    done = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout.strip()
    if out.endswith("SKIP"):
        pytest.skip("Numba's threads here are not GNU OpenMP's: forked workers can simulate")
    # (the DataLoader re-raises the worker's error with the worker's traceback in its text)
    assert "ERROR" in out and "multiprocessing_context='spawn'" in out


LABELLED = {
    "seed": 5,
    "images": 5,
    "shard_size": 2,
    "base": "-cell 30 32 34 90 90 90 -default_F 100 -N 6 -lambda 1.0 -distance 50 -pixel 0.1 -detpixels 32 "
            "-oversample 1 -gauss_xtal",
    "vary": {"orientation": "uniform"},
    "outputs": {"float": True, "counts": "uint16", "labels": True},
}


def test_labels_in_the_dataset_and_the_streams(tmp_path):
    """outputs: {labels: true}: each frame's reflection table and label images are in the
    shards (and the master), readable with h5py and pandas, equal to simulate(labels=True)
    of the frame's experiment, and the streams give them from files and from the spec."""
    import nbragg
    from nbragg.dataset import base_experiment, frame_experiment, frame_parameters, read_reflections
    path = Path(generate(LABELLED, tmp_path / "lab.h5", workers=0, progress=False))
    spec = load_spec(LABELLED)
    table = read_reflections(path)
    assert list(table.columns) == ["frame", "h", "k", "l", "panel", "fast", "slow", "photons", "partiality", "d"]
    assert sorted(set(table.frame)) == list(range(5))
    with h5py.File(path, "r") as fh:
        masks = fh["entry/nbragg/labels/spot_mask"][()]
        refl = fh["entry/nbragg/labels/reflection"][()]
    base = base_experiment(spec)
    for i in (0, 3):
        values, orientation = frame_parameters(spec, base, i)
        r = nbragg.simulate(frame_experiment(base, values, orientation), labels=True, warn=lambda m: None)
        mine = read_reflections(path, frame=i)
        assert np.array_equal(mine[["h", "k", "l"]].to_numpy(), r.reflections[["h", "k", "l"]].to_numpy())
        np.testing.assert_allclose(mine.photons, r.reflections.photons, rtol=1e-12)
        assert np.array_equal(refl[i], r.labels.reflection) and np.array_equal(masks[i] == 1, r.labels.spot_mask)
    from_files = list(frames_from_files(path))
    from_spec = list(frames_from_spec(LABELLED))
    for a, b in zip(from_files, from_spec):
        _assert_same(a, b)
    assert from_files[2]["reflections"]["h"].dtype == np.int64 and len(from_files[2]["reflections"]["photons"])


def test_labelled_frames_batch_with_the_collate(tmp_path):
    torch = pytest.importorskip("torch")
    from nbragg.dataset.stream import FrameDataset, collate
    path = Path(generate(LABELLED, tmp_path / "lab.h5", workers=0, progress=False))
    batch = next(iter(torch.utils.data.DataLoader(FrameDataset(str(path)), batch_size=3, collate_fn=collate)))
    assert tuple(batch["image"].shape) == (3, 32, 32) and len(batch["reflections"]) == 3
    assert batch["reflections"][1]["h"].dtype == torch.int64
