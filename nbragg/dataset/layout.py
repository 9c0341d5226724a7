"""The files of a dataset: staged frames, NXmx shards, the virtual-dataset master, and
reading them back."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from ..io.atomic import atomic_file, atomic_path
from .frames import base_experiment, simulate_frame
from ..labels import COLUMNS as REFLECTION_COLUMNS
from .spec import COUNT_TYPES, DatasetError



class _Paths:
    def __init__(self, output):
        self.master = os.path.abspath(os.fspath(output))
        stem, _ = os.path.splitext(self.master)
        self.stem = stem
        self.staging = stem + ".parts"
        self.digest_key = hashlib.sha256(self.master.encode()).hexdigest()[:8]

    def shard(self, k):
        return f"{self.stem}_shard{k:05d}.h5"

    def frame(self, i):
        return os.path.join(self.staging, f"frame{i:08d}.npz")


def _compression_kwargs(spec):
    if spec.compression == "bitshuffle":
        try:
            import hdf5plugin
            return dict(hdf5plugin.Bitshuffle(cname="lz4"))
        except ImportError:
            return {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    if spec.compression == "gzip":
        return {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    return {}


def _atomic_npz(path, arrays):
    with atomic_file(path) as fh:
        np.savez(fh, **arrays)


def stage_frame(spec, output, index, threads=None, keep=None, backend="cpu"):
    """Simulate frame ``index`` and commit it to the staging folder (atomic).

    ``keep``, a dict, receives the frame's arrays too (so that assembling the shard in
    the same process need not read them back)."""
    paths = _Paths(output)
    target = paths.frame(index)
    if os.path.exists(target):
        return index
    out = simulate_frame(spec, index, threads=threads, backend=backend)
    _atomic_npz(target, out)
    if keep is not None:
        keep[index] = out
    return index


def _shard_frames(spec, k):
    return range(k * spec.shard_size, min((k + 1) * spec.shard_size, spec.images))


def _shard_valid(spec, path):
    if not os.path.exists(path):
        return False
    import h5py
    try:
        with h5py.File(path, "r", locking=False) as fh:
            grp = fh["entry/nbragg"]
            if grp.attrs.get("spec_digest") != spec.digest():
                raise DatasetError(f"{path} was made from a different spec; move it away or choose another output")
            return bool(np.all(grp["completed"][()] == 1))
    except DatasetError:
        raise
    except Exception:
        return False


def assemble_shard(spec, output, k, kept=None):
    """Write shard ``k`` from its staged frames (temporary name, then rename); frames
    found in ``kept`` (index -> arrays) are not read back from disk."""
    import h5py
    from ..engine import build_model
    paths = _Paths(output)
    target = paths.shard(k)
    if _shard_valid(spec, target):
        return k
    frames = list(_shard_frames(spec, k))
    base = base_experiment(spec)
    model = build_model(base, warn=lambda m: None)
    S, F = model.shape
    n = len(frames)
    comp = _compression_kwargs(spec)
    names = spec.varied_names()
    with atomic_path(target) as tmp:
        with h5py.File(tmp, "w", locking=False) as fh:
            entry = fh.create_group("entry")
            data = entry.create_group("data")
            main_dtype = COUNT_TYPES[spec.counts] if spec.counts else np.float32
            dsets = {"data": data.create_dataset("data", (n, S, F), dtype=main_dtype, chunks=(1, S, F), **comp)}
            if spec.counts and spec.float_out:
                dsets["photons"] = data.create_dataset("photons", (n, S, F), dtype=np.float32, chunks=(1, S, F),
                                                       **comp)
            nb = entry.create_group("nbragg")
            nb.attrs["NX_class"] = np.bytes_("NXcollection")
            nb.attrs["spec_digest"] = spec.digest()
            nb.attrs["spec"] = spec.canonical()
            nb.create_dataset("frame_index", data=np.array(frames, dtype=np.int64))
            pars = {nm: nb.create_dataset(nm, (n,), dtype=np.float64) for nm in names}
            ori = nb.create_dataset("orientation", (n, 3, 3), dtype=np.float64)
            jac = None
            if spec.jacobian:
                jg = nb.create_group("jacobian")
                jac = {nm: jg.create_dataset(nm, (n, S, F), dtype=np.float32, chunks=(1, S, F), **comp)
                       for nm in spec.jacobian}
            lab = None
            if spec.labels:
                lg = nb.create_group("labels")
                lab = {"reflection": lg.create_dataset("reflection", (n, S, F), dtype=np.int32, chunks=(1, S, F),
                                                       **comp),
                       "spot_mask": lg.create_dataset("spot_mask", (n, S, F), dtype=np.uint8, chunks=(1, S, F),
                                                      **comp)}
                rows = []
            spectra = None
            if spec.spectrum:
                spectra = nb.create_dataset("spectrum", (n, spec.spectrum_channels(), 2), dtype=np.float64)
                spectra.attrs["columns"] = np.bytes_("wavelength_A weight")
            completed = nb.create_dataset("completed", (n,), dtype=np.uint8)
            for j, i in enumerate(frames):
                with _frame_arrays(paths.frame(i), kept, i) as z:
                    if spec.counts:
                        dsets["data"][j] = z["counts"]
                        if spec.float_out:
                            dsets["photons"][j] = z["photons"]
                    else:
                        dsets["data"][j] = z["photons"]
                    for q, nm in enumerate(names):
                        pars[nm][j] = z["params"][q]
                    ori[j] = z["orientation"]
                    if spectra is not None:
                        spectra[j] = z["spectrum"]
                    if jac is not None:
                        for q, nm in enumerate(spec.jacobian):
                            jac[nm][j] = z["jacobian"][q]
                    if lab is not None:
                        lab["reflection"][j] = z["label_reflection"]
                        lab["spot_mask"][j] = z["label_spot_mask"]
                        table = np.asarray(z["reflections"]).reshape(-1, len(REFLECTION_COLUMNS))
                        rows.append(np.column_stack([np.full(len(table), i, dtype=np.float64), table]))
                completed[j] = 1      # after the frame's data
            if lab is not None:
                _write_reflections(nb, np.concatenate(rows) if rows else np.zeros((0, 1 + len(REFLECTION_COLUMNS))))
            from ..io.nexus import write_nxmx
            write_nxmx(entry, model, n)
    for i in frames:
        try:
            os.unlink(paths.frame(i))
        except OSError:
            pass
    return k


_INTEGER_COLUMNS = ("frame", "h", "k", "l", "panel")


def _write_reflections(nb, rows):
    """The shard's reflection tables, one row per reflection of every frame, as a group of
    equal-length columns (``frame`` first): pandas.DataFrame({c: g[c][()] for c in g})."""
    g = nb.create_group("reflections")
    g.attrs["NX_class"] = np.bytes_("NXcollection")
    for c, col in zip(("frame",) + REFLECTION_COLUMNS, rows.T):
        g.create_dataset(c, data=col.astype(np.int64) if c in _INTEGER_COLUMNS else col)
    g.attrs["columns"] = np.array(("frame",) + REFLECTION_COLUMNS, dtype=object).astype("S")


class _frame_arrays:
    """Context manager giving a staged frame's arrays, from memory or from its file."""

    def __init__(self, path, kept, index):
        self.path, self.kept, self.index = path, kept, index
        self.z = None

    def __enter__(self):
        if self.kept is not None and self.index in self.kept:
            return self.kept[self.index]
        self.z = np.load(self.path)
        return self.z

    def __exit__(self, *exc):
        if self.z is not None:
            self.z.close()
        return False


def write_master(spec, output):
    """The master file: NXmx metadata and virtual datasets over the shards (atomic)."""
    import h5py
    from ..engine import build_model
    paths = _Paths(output)
    model = build_model(base_experiment(spec), warn=lambda m: None)
    S, F = model.shape
    N = spec.images
    names = spec.varied_names()
    main_dtype = COUNT_TYPES[spec.counts] if spec.counts else np.float32

    def vds(shape, dtype, dset_path):
        layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
        for k in range(spec.nshards):
            fr = list(_shard_frames(spec, k))
            src = h5py.VirtualSource(os.path.basename(paths.shard(k)), dset_path,
                                     shape=(len(fr),) + tuple(shape[1:]))
            layout[fr[0]:fr[-1] + 1] = src
        return layout

    with atomic_path(paths.master) as tmp:
        with h5py.File(tmp, "w", locking=False) as fh:
            entry = fh.create_group("entry")
            data = entry.create_group("data")
            data.create_virtual_dataset("data", vds((N, S, F), main_dtype, "entry/data/data"), fillvalue=0)
            if spec.counts and spec.float_out:
                data.create_virtual_dataset("photons", vds((N, S, F), np.float32, "entry/data/photons"), fillvalue=0)
            nb = entry.create_group("nbragg")
            nb.attrs["NX_class"] = np.bytes_("NXcollection")
            nb.attrs["spec_digest"] = spec.digest()
            nb.attrs["spec"] = spec.canonical()
            nb.attrs["shards"] = np.array([os.path.basename(paths.shard(k)) for k in range(spec.nshards)],
                                          dtype=h5py.string_dtype())
            for nm in names:
                nb.create_virtual_dataset(nm, vds((N,), np.float64, f"entry/nbragg/{nm}"), fillvalue=np.nan)
            nb.create_virtual_dataset("orientation", vds((N, 3, 3), np.float64, "entry/nbragg/orientation"),
                                      fillvalue=np.nan)
            nb.create_virtual_dataset("completed", vds((N,), np.uint8, "entry/nbragg/completed"), fillvalue=0)
            if spec.spectrum:
                nb.create_virtual_dataset("spectrum", vds((N, spec.spectrum_channels(), 2), np.float64,
                                                          "entry/nbragg/spectrum"), fillvalue=np.nan)
            if spec.labels:
                lg = nb.create_group("labels")
                lg.create_virtual_dataset("reflection", vds((N, S, F), np.int32, "entry/nbragg/labels/reflection"),
                                          fillvalue=-1)
                lg.create_virtual_dataset("spot_mask", vds((N, S, F), np.uint8, "entry/nbragg/labels/spot_mask"),
                                          fillvalue=0)
                _reflections_master(nb, paths, spec)
            from ..io.nexus import write_nxmx
            write_nxmx(entry, model, N)
    return paths.master


def _reflections_master(nb, paths, spec):
    """The shards' reflection tables, end to end, as virtual columns of the master."""
    import h5py
    lengths = []
    for k in range(spec.nshards):
        with h5py.File(paths.shard(k), "r", locking=False) as sh:
            lengths.append(sh["entry/nbragg/reflections/frame"].shape[0])
    g = nb.create_group("reflections")
    g.attrs["NX_class"] = np.bytes_("NXcollection")
    total = int(sum(lengths))
    for c in ("frame",) + REFLECTION_COLUMNS:
        dtype = np.int64 if c in _INTEGER_COLUMNS else np.float64
        layout = h5py.VirtualLayout(shape=(total,), dtype=dtype)
        at = 0
        for k, n in enumerate(lengths):
            if n:
                layout[at:at + n] = h5py.VirtualSource(os.path.basename(paths.shard(k)),
                                                       f"entry/nbragg/reflections/{c}", shape=(n,))
            at += n
        g.create_virtual_dataset(c, layout)
    g.attrs["columns"] = np.array(("frame",) + REFLECTION_COLUMNS, dtype=object).astype("S")


def read_reflections(output, frame=None):
    """The reflection tables of a dataset made with ``outputs: {labels: true}`` as a pandas
    DataFrame (column ``frame`` first); ``frame`` selects one frame's rows."""
    try:
        import pandas as pd
    except ImportError:
        raise DatasetError("reading reflection tables needs pandas: pip install pandas") from None
    with open_dataset(output) as fh:
        if "entry/nbragg/reflections" not in fh:
            raise DatasetError(f"{output!r} has no reflection tables (made without outputs: {{labels: true}})")
        g = fh["entry/nbragg/reflections"]
        cols = {c: g[c][()] for c in ("frame",) + REFLECTION_COLUMNS}
    table = pd.DataFrame(cols)
    if frame is not None:
        table = table[table.frame == int(frame)].reset_index(drop=True)
    return table


def open_dataset(path):
    """A generated dataset (master or shard) as an open, read-only ``h5py.File``, with the
    compression filters it may use loaded (hdf5plugin's bitshuffle, when installed)::

        with nbragg.dataset.open("out.h5") as fh:
            frames = fh["entry/data/data"][:10]
    """
    import h5py
    try:
        import hdf5plugin  # noqa: F401  (registers the bitshuffle filter with HDF5)
    except ImportError:
        pass
    if not os.path.exists(path):
        raise DatasetError(f"dataset {path!r} does not exist")
    return h5py.File(path, "r", locking=False)


def _read(fh, name, index=()):
    try:
        return fh[name][index]
    except OSError as exc:
        if "filter" in str(exc).lower() or "plugin" in str(exc).lower():
            raise DatasetError(f"{fh.filename}: {name} is compressed with a filter HDF5 cannot load here; "
                               "install hdf5plugin (pip install hdf5plugin)") from None
        raise


def read_frame(output, index, dataset="data"):
    """One frame from a generated dataset (via the master's virtual dataset)."""
    with open_dataset(output) as fh:
        return _read(fh, "entry/data/" + dataset, index)


def read_parameters(output):
    """{name: array over frames} and the orientations from a generated dataset."""
    import h5py
    with open_dataset(output) as fh:
        nb = fh["entry/nbragg"]
        spec = json.loads(nb.attrs["spec"])
        out = {}
        for k in nb:
            if isinstance(nb[k], h5py.Dataset) and k not in ("orientation", "completed", "frame_index"):
                out[k] = nb[k][()]
        return out, nb["orientation"][()], spec
