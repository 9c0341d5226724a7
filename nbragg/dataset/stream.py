"""Streaming frames for training: from the shards nbragg-dataset wrote, or simulated on
the fly from a dataset spec, frame by frame.

:func:`frames_from_files` and :func:`frames_from_spec` are plain generators (numpy, no
PyTorch); ``FrameDataset`` is a ``torch.utils.data.IterableDataset`` over either source
(PyTorch is imported when the class is first used).  Both sources give the same frame i:
a simulated frame's randomness comes from (spec seed, i) only, so what a DataLoader
worker yields does not depend on how many workers there are.

Each frame is a dict::

    index        the frame's index in the dataset
    image        /entry/data/data: counts (uint16/uint32) or, without counts, photons (float32)
    photons      the float32 photons, when counts and photons are both stored (keys)
    jacobian     (parameters, slow, fast) float32 dI/dtheta, when stored (keys)
    params       {name: value} of the frame's drawn parameters, in the table's order
    orientation  the drawn 3x3 rotation (identity when orientations do not vary)
    labels       {name: array} of further per-frame datasets a file holds (when any):
                 with ``outputs: {labels: true}``, "labels/reflection" and "labels/spot_mask"
    reflections  with ``outputs: {labels: true}``: the frame's reflection table,
                 {column: array} (columns of nbragg.labels.COLUMNS)
"""

from __future__ import annotations

import json
import os
import sys
from collections import OrderedDict

import numpy as np

from .spec import DatasetError, DatasetSpec, load_spec

__all__ = ["frames_from_files", "frames_from_spec"]

# datasets of /entry/nbragg that are bookkeeping, not per-frame labels
_BOOKKEEPING = ("orientation", "completed", "frame_index")
_OPEN_FILES = 4     # shards kept open while streaming (a shuffled order hops between them)


# -- argument checks -----------------------------------------------------------------

def _whole(name, value, least=0):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise DatasetError(f"{name} = {value!r}: give a whole number of at least {least}")
    return int(value)


def _frame_range(start, stop, images):
    """[start, stop) checked against a dataset of ``images`` frames."""
    start = _whole("start", start)
    stop = images if stop is None else _whole("stop", stop)
    if stop > images:
        raise DatasetError(f"stop = {stop} is beyond the dataset's {images} frames")
    if start > stop:
        raise DatasetError(f"start = {start} is after stop = {stop}")
    return start, stop


def _keys(keys):
    if isinstance(keys, str):
        keys = (keys,)
    keys = tuple(keys)
    if not keys or not all(isinstance(k, str) for k in keys):
        raise DatasetError(f"keys = {keys!r}: name the per-frame images to read, e.g. ('data', 'photons')")
    return keys


def _as_spec(spec):
    if isinstance(spec, DatasetSpec):
        return spec
    if isinstance(spec, (dict, str, os.PathLike)):
        return load_spec(spec)
    raise DatasetError(f"a dataset spec is a DatasetSpec, a dict or a YAML/JSON path, not {type(spec).__name__}")


def _spec_from_stored(text):
    """The DatasetSpec a file's ``spec`` attribute describes (its canonical JSON), enough
    for the parameter names and outputs; the base's input files are not needed."""
    c = json.loads(text)
    return DatasetSpec(seed=c["seed"], images=c["images"], shard_size=c["shard_size"], base=c["base"], base_dir="",
                       vary=c["vary"], float_out=c["float"], counts=c["counts"], jacobian=list(c["jacobian"]),
                       compression=c["compression"], precision=c.get("precision", "float64"),
                       response=c.get("response") or {}, background=c.get("background") or [],
                       labels=bool(c.get("labels", False)), spectrum=c.get("spectrum") or {})


def _spec_images(spec):
    """The per-frame images a spec's dataset stores, by name ('data' first)."""
    names = ["data"]
    if spec.counts and spec.float_out:
        names.append("photons")
    if spec.jacobian:
        names.append("jacobian")
    return names


def _check_keys(keys, present, where):
    for k in keys:
        if k not in present:
            raise DatasetError(f"{where} stores no per-frame {k!r} (it stores: {', '.join(present)})")


# -- simulated on the fly --------------------------------------------------------------

class _SpecSource:
    """Frames simulated from a spec, as nbragg-dataset would store them."""

    def __init__(self, spec, keys=("data",)):
        self.spec = _as_spec(spec)
        self.keys = _keys(keys)
        _check_keys(self.keys, _spec_images(self.spec), "the spec's dataset")
        self.param_names = self.spec.varied_names()
        self.images = self.spec.images

    def available(self, start=0, stop=None):
        start, stop = _frame_range(start, stop, self.images)
        return np.arange(start, stop, dtype=np.int64)

    def frames(self, indices, threads=None):
        from .frames import simulate_frame
        spec = self.spec
        for i in indices:
            i = int(i)
            out = simulate_frame(spec, i, threads=threads)
            # what the shard stores for the frame (as layout.assemble_shard writes it)
            stored = {"data": out["counts"] if spec.counts else out["photons"]}
            if spec.counts and spec.float_out:
                stored["photons"] = out["photons"]
            if spec.jacobian:
                stored["jacobian"] = out["jacobian"]
            frame = {"index": i}
            for k in self.keys:
                frame["image" if k == "data" else k] = stored[k]
            frame["params"] = {n: float(v) for n, v in zip(self.param_names, out["params"])}
            frame["orientation"] = np.asarray(out["orientation"], dtype=np.float64)
            if spec.labels:
                frame["labels"] = {"labels/reflection": out["label_reflection"],
                                   "labels/spot_mask": out["label_spot_mask"]}
                frame["reflections"] = _table_columns(out["reflections"])
            yield frame


def _table_columns(rows):
    """{column: array} of a frame's reflection table (rows in nbragg.labels.COLUMNS order)."""
    from ..labels import COLUMNS
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, len(COLUMNS))
    return {c: (rows[:, j].astype(np.int64) if c in ("h", "k", "l", "panel") else rows[:, j])
            for j, c in enumerate(COLUMNS)}


def frames_from_spec(spec, start=0, stop=None, keys=("data",), threads=None):
    """Simulate frames ``start`` .. ``stop - 1`` of a dataset spec, one at a time.

    Each frame is the one nbragg-dataset would store for that spec, bit for bit: the same
    per-frame draws (from the spec's seed and the frame index), the same image (counts
    and/or float32 photons).  ``spec`` is a :class:`DatasetSpec`, a dict or a YAML/JSON
    path; ``keys`` names the per-frame images wanted ("data" -- yielded as ``image`` --,
    "photons", "jacobian", as the spec stores them); ``threads``: Numba threads per frame
    (None: all).  Returns a generator of dicts (see the module's documentation); the
    arguments are checked at once.
    """
    source = _SpecSource(spec, keys)
    return source.frames(source.available(start, stop), threads=threads)


# -- read from the shards ----------------------------------------------------------------

def _open(path):
    """An nbragg dataset file opened read-only (one-line errors for anything else)."""
    from .layout import open_dataset
    if os.path.isdir(path):
        raise DatasetError(f"{path!r} is a folder, not a dataset file")
    try:
        fh = open_dataset(path)
    except OSError:
        raise DatasetError(f"{path!r} is not an nbragg dataset (not an HDF5 file)") from None
    nb = fh.get("entry/nbragg")
    if nb is None or "spec_digest" not in nb.attrs or "spec" not in nb.attrs:
        fh.close()
        raise DatasetError(f"{path!r} is not an nbragg dataset (it has no /entry/nbragg spec)")
    return fh


def _text(v):
    return v.decode() if isinstance(v, bytes) else str(v)


class _FileSource:
    """Frames read from a dataset's shards (a master stands for the shards beside it)."""

    def __init__(self, paths, keys=("data",)):
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        paths = [os.path.abspath(os.fspath(p)) for p in paths]
        if not paths:
            raise DatasetError("no dataset files given")
        self.keys = _keys(keys)
        shards, seen = [], set()
        for p in paths:
            for s in self._shards_of(p):
                if os.path.realpath(s) not in seen:     # a master and its shard name the same frames
                    seen.add(os.path.realpath(s))
                    shards.append(s)
        self.files, self.rows = [], {}   # rows: frame index -> (file number, row)
        digest = None
        for s in shards:
            with _open(s) as fh:
                nb = fh["entry/nbragg"]
                d = _text(nb.attrs["spec_digest"])
                if digest is None:
                    digest, first = d, s
                    self.spec = _spec_from_stored(_text(nb.attrs["spec"]))
                    self.param_names = self.spec.varied_names()
                    self.label_names = self._labels(nb)
                    present = [k for k in fh["entry/data"] if isinstance(fh["entry/data"][k], _h5dataset())]
                    present = ["data"] + sorted(k for k in present if k != "data")
                    if "jacobian" in nb:
                        present.append("jacobian")
                    _check_keys(self.keys, present, repr(s))
                elif d != digest:
                    raise DatasetError(f"{s!r} and {first!r} come from different dataset specs")
                index = nb["frame_index"][()]
                done = nb["completed"][()]
            k = len(self.files)
            self.files.append(s)
            for row, (i, ok) in enumerate(zip(index, done)):
                if not ok:
                    continue      # a frame not (yet) committed is not part of the dataset
                i = int(i)
                if i in self.rows:
                    raise DatasetError(f"frame {i} is in both {self.files[self.rows[i][0]]!r} and {s!r}")
                self.rows[i] = (k, row)
        self.images = self.spec.images
        self._indices = np.array(sorted(self.rows), dtype=np.int64)

    @staticmethod
    def _shards_of(path):
        """A shard is itself; a master file is its shards (those beside it)."""
        with _open(path) as fh:
            nb = fh["entry/nbragg"]
            if "frame_index" in nb:
                return [path]
            names = [_text(n) for n in nb.attrs.get("shards", [])]
        if not names:
            raise DatasetError(f"{path!r} is not an nbragg dataset (neither a shard nor a master naming shards)")
        folder = os.path.dirname(path)
        found = [os.path.join(folder, n) for n in names if os.path.exists(os.path.join(folder, n))]
        if not found:
            raise DatasetError(f"{path!r}: none of its shard files ({', '.join(names[:2])}, ...) is beside it")
        return found

    def _labels(self, nb):
        """Per-frame datasets under /entry/nbragg other than the parameters, bookkeeping
        and the Jacobian (which ``keys`` asks for)."""
        n = nb["frame_index"].shape[0]
        skip = set(self.param_names) | set(_BOOKKEEPING)
        found = []
        h5ds = _h5dataset()

        def visit(name, obj):
            if (isinstance(obj, h5ds) and name not in skip and not name.startswith(("jacobian/", "reflections/"))
                    and obj.ndim >= 1 and obj.shape[0] == n):
                found.append(name)
        nb.visititems(visit)
        return sorted(found)

    def available(self, start=0, stop=None):
        start, stop = _frame_range(start, stop, self.images)
        idx = self._indices
        return idx[(idx >= start) & (idx < stop)]

    def frames(self, indices, threads=None):
        from .layout import _read
        handles = OrderedDict()     # file number -> (h5py.File, its per-shard arrays)
        try:
            for i in indices:
                i = int(i)
                if i not in self.rows:
                    raise DatasetError(f"frame {i} is not among the dataset's completed frames")
                k, row = self.rows[i]
                if k in handles:
                    handles.move_to_end(k)
                else:
                    if len(handles) >= _OPEN_FILES:
                        handles.popitem(last=False)[1][0].close()
                    fh = _open(self.files[k])
                    nb = fh["entry/nbragg"]
                    # the parameter table, orientations and reflection tables are small: read them whole
                    refl = None
                    if "reflections" in nb:
                        from ..labels import COLUMNS
                        refl = {c: nb["reflections/" + c][()] for c in ("frame",) + COLUMNS}
                    handles[k] = (fh, {n: nb[n][()] for n in self.param_names}, nb["orientation"][()], refl)
                fh, table, orient, refl = handles[k]
                frame = {"index": i}
                for key in self.keys:
                    if key == "jacobian":   # one dataset per parameter, stacked in the spec's order
                        frame[key] = np.stack([_read(fh, "entry/nbragg/jacobian/" + n, row)
                                               for n in self.spec.jacobian])
                    else:
                        frame["image" if key == "data" else key] = _read(fh, "entry/data/" + key, row)
                frame["params"] = {n: float(table[n][row]) for n in self.param_names}
                frame["orientation"] = orient[row]
                if self.label_names:
                    frame["labels"] = {n: _read(fh, "entry/nbragg/" + n, row) for n in self.label_names}
                if refl is not None:
                    mine = refl["frame"] == i
                    frame["reflections"] = {c: v[mine] for c, v in refl.items() if c != "frame"}
                yield frame
        finally:
            for fh, *_ in handles.values():
                fh.close()


def _h5dataset():
    import h5py
    return h5py.Dataset


def frames_from_files(path_or_paths, keys=("data",), start=0, stop=None):
    """Frames of a dataset nbragg-dataset wrote, read one at a time, in frame-index order.

    ``path_or_paths``: the master file (which stands for the shard files beside it), one
    shard, or a list of shards/masters of the same dataset.  Files are opened read-only
    (without HDF5 file locking, so a dataset being written can be read); at most a few
    are open at once.  ``keys`` names the per-frame images wanted: "data" (yielded as
    ``image``, counts or float32 photons as stored), "photons", "jacobian", or another
    dataset of /entry/data.  Frames ``start`` <= index < ``stop`` are yielded.

    Frames whose ``completed`` flag is not set are skipped, as are the frames of a
    master's shards that are missing: they are not part of the dataset (yet).

    Returns a generator of dicts (see the module's documentation); the files and the
    arguments are checked at once.
    """
    source = _FileSource(path_or_paths, keys)
    return source.frames(source.available(start, stop))


def _source(source, keys):
    """A spec (DatasetSpec, dict, YAML/JSON path) or dataset files (HDF5 paths)."""
    if isinstance(source, (_SpecSource, _FileSource)):
        return source
    if isinstance(source, (DatasetSpec, dict)):
        return _SpecSource(source, keys)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise DatasetError(f"{path!r} does not exist")
        import h5py
        return _FileSource(path, keys) if h5py.is_hdf5(path) else _SpecSource(path, keys)
    if isinstance(source, (list, tuple)):
        return _FileSource(list(source), keys)
    raise DatasetError(f"a frame source is a dataset spec or dataset files, not {type(source).__name__}")


# -- Numba's GNU OpenMP threads do not survive a fork -------------------------------------

def _gnu_openmp_started():
    """True when this process has started Numba's threads on the GNU OpenMP layer (a
    child forked from it aborts on its first parallel kernel)."""
    parallel = sys.modules.get("numba.np.ufunc.parallel")
    if parallel is None or not getattr(parallel, "_is_initialized", False):
        return False
    try:
        import numba
        if numba.threading_layer() != "omp":
            return False
        from numba.np.ufunc import omppool
        return getattr(omppool, "openmp_vendor", "GNU") == "GNU"
    except Exception:
        return False


_forked_after_openmp = False


def _after_fork():
    global _forked_after_openmp
    _forked_after_openmp = _forked_after_openmp or _gnu_openmp_started()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


# -- PyTorch ----------------------------------------------------------------------------

def _tensor(torch, value):
    if isinstance(value, np.ndarray) and (value.dtype.kind in "biuf"):
        return torch.from_numpy(np.ascontiguousarray(value))
    return value


def _make_frame_dataset():
    try:
        import torch
    except ImportError:
        raise DatasetError('FrameDataset needs PyTorch (pip install "nbragg[torch]"); '
                           "frames_from_files and frames_from_spec work without it") from None
    from torch.utils.data import IterableDataset, get_worker_info

    class FrameDataset(IterableDataset):
        """Frames of a dataset as a ``torch.utils.data.IterableDataset``.

        ``source``: a dataset spec (a :class:`DatasetSpec`, a dict, or a YAML/JSON path) --
        frames are simulated on the fly --, or dataset files (a master, a shard, or a list
        of them) -- frames are read from the shards.  ``keys``, ``start`` and ``stop`` are
        those of :func:`frames_from_files`/:func:`frames_from_spec`.

        Each item is a dict: ``index`` (int), ``image`` (a tensor of the stored type:
        uint16/uint32 counts or float32 photons), ``params`` (float64 tensor, in the order
        of ``param_names``), ``orientation`` (3x3 float64), and ``photons``, ``jacobian``,
        ``labels`` as the generators give them (as tensors).  ``transform(item)``, when
        given, is applied to each item in the worker.

        DataLoader workers split the frames: worker w of W takes the w-th, (w+W)-th, ...
        frame of the order.  Frame i is the same whoever computes it (its randomness
        comes from the spec's seed and i), so 0, 1 or more workers give the same frames;
        with the DataLoader's in-order delivery, in the same order.  ``shuffle_seed``
        permutes the order, the same permutation in every worker, a new one for each
        epoch set by :meth:`set_epoch` (call it before iterating; persistent workers
        keep the epoch they started with).

        Simulating in workers: each worker runs its frames with one Numba thread (unless
        ``threads`` says otherwise), so workers do not oversubscribe the cores.  A worker
        forked from a process that has already run Numba's GNU OpenMP threads cannot
        simulate: give the DataLoader ``multiprocessing_context="spawn"`` (or set
        NUMBA_THREADING_LAYER=workqueue before importing nbragg).
        """

        def __init__(self, source, keys=("data",), start=0, stop=None, shuffle_seed=None, threads=None,
                     transform=None):
            super().__init__()
            self.source = _source(source, keys)
            self.indices = self.source.available(start, stop)
            if shuffle_seed is not None:
                _whole("shuffle_seed", shuffle_seed)
            if threads is not None:
                _whole("threads", threads, 1)
            if transform is not None and not callable(transform):
                raise DatasetError("transform must be a callable(item) or None")
            self.shuffle_seed = shuffle_seed
            self.threads = threads
            self.transform = transform
            self.epoch = 0

        @property
        def param_names(self):
            """The names of ``params``' entries, in order."""
            return list(self.source.param_names)

        def set_epoch(self, epoch):
            """Choose the epoch whose permutation ``shuffle_seed`` gives."""
            self.epoch = _whole("epoch", epoch)

        def __len__(self):
            return len(self.indices)

        def order(self):
            """The frame indices of this epoch, in the order they are delivered."""
            if self.shuffle_seed is None:
                return self.indices
            rng = np.random.default_rng([self.shuffle_seed, self.epoch])
            return self.indices[rng.permutation(len(self.indices))]

        def __iter__(self):
            order = self.order()
            info = get_worker_info()
            threads = self.threads
            if info is not None:
                order = order[info.id::info.num_workers]
                if isinstance(self.source, _SpecSource):
                    if _forked_after_openmp:
                        raise DatasetError(
                            "this DataLoader worker was forked after Numba's GNU OpenMP threads ran in the parent, "
                            "and cannot simulate: pass multiprocessing_context='spawn' to the DataLoader "
                            "(or set NUMBA_THREADING_LAYER=workqueue before importing nbragg)")
                    if threads is None:
                        threads = 1     # the workers share the cores
            for frame in self.source.frames(order, threads=threads):
                item = {k: ({n: _tensor(torch, a) for n, a in v.items()} if k in ("labels", "reflections")
                            else _tensor(torch, v))
                        for k, v in frame.items() if k != "params"}
                item["params"] = torch.tensor([frame["params"][n] for n in self.source.param_names],
                                              dtype=torch.float64)
                yield item if self.transform is None else self.transform(item)

    FrameDataset.__module__ = __name__
    FrameDataset.__qualname__ = "FrameDataset"
    return FrameDataset


def __getattr__(name):
    # FrameDataset subclasses torch's IterableDataset: built (and torch imported) on first use
    if name == "FrameDataset":
        cls = _make_frame_dataset()
        globals()["FrameDataset"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def collate(items):
    """A DataLoader ``collate_fn`` for batches of labelled frames: images, parameters and
    label images stacked as usual, the reflection tables (one length per frame) kept as a
    list of {column: tensor}."""
    import torch.utils.data as tud
    tables = [it.pop("reflections") for it in items] if items and "reflections" in items[0] else None
    batch = tud.default_collate(items)
    if tables is not None:
        batch["reflections"] = tables
    return batch

