"""Many simulated images in HDF5 (NeXus/NXmx), resumable, on Dask when wanted.

A spec (YAML or JSON) names a base experiment, how parameters vary from frame to frame,
how many frames, and what to store::

    seed: 1234
    images: 100
    shard_size: 25                  # frames per shard file
    base: "-cell 79 79 38 90 90 90 -default_F 100 -N 10 -lambda 1 -distance 100 -detpixels 256"
    vary:
      orientation: uniform          # a random rotation, uniform over SO(3), before the misset
      cell_a: {jitter: 0.01}        # normal, relative sd around the base value
      Na: {integers: [5, 15]}       # uniform integers, inclusive
      wavelength: {uniform: [0.98, 1.02]}
      distance: {normal: [100, 1]}
      fluence: {loguniform: [1e28, 1e30]}
    outputs:
      float: true                   # photons, float32
      counts: uint16                # Poisson counts (uint16, uint32, or none)
      jacobian: [cell_a, Na]        # optional dI/dtheta images per frame
    compression: bitshuffle         # bitshuffle (hdf5plugin), gzip, or none

``base`` is a nanoBragg command line (a string or a list); file names in it are relative
to the spec's folder.  Any scalar parameter of :mod:`nbragg.params` can vary, as a fixed
number, ``{uniform: [lo, hi]}``, ``{normal: [mean, sd]}``, ``{jitter: relative_sd}``,
``{loguniform: [lo, hi]}``, ``{integers: [lo, hi]}`` or ``{choice: [...]}``.  ``cell_jitter:
r`` jitters a, b and c together.  Frame i's parameters and noise come from generators
seeded by (seed, i), so the content does not depend on the number of workers, on the
order frames finish in, or on interruptions.

Layout: OUTPUT.h5 is a master file whose /entry/data/data (and parameter table) are
virtual datasets over the shard files OUTPUT_shard00000.h5, ... beside it.  Each shard is
a complete NXmx file: /entry/data/data (one frame per chunk, compressed), instrument,
beam, detector and sample groups for the base geometry, and /entry/nbragg with one
dataset per varied parameter (frame order), the orientations, and a ``completed`` mask.

Crash safety: every frame is committed on its own -- its images and parameters written
to a staging file that is renamed into OUTPUT.parts/ only when complete -- and a shard is
assembled (to a temporary name, then renamed) once all its frames are staged.  A killed
run loses at most the frames being computed; running the same command again continues
and produces the same frames and parameters as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

from .errors import InputFileError, NbraggError
from .io.atomic import atomic_file, atomic_path, partial_name_pattern

DIST_KINDS = ("uniform", "normal", "jitter", "loguniform", "integers", "choice")
COUNT_TYPES = {"uint16": np.uint16, "uint32": np.uint32}


class DatasetError(NbraggError):
    """A dataset spec or output that cannot be used."""


@dataclass
class DatasetSpec:
    seed: int
    images: int
    shard_size: int
    base: List[str]
    base_dir: str
    vary: dict = field(default_factory=dict)
    float_out: bool = True
    counts: Optional[str] = "uint16"
    jacobian: List[str] = field(default_factory=list)
    compression: str = "bitshuffle"
    precision: str = "float64"

    def canonical(self):
        """A JSON text that identifies the content the spec produces."""
        content = {"seed": self.seed, "images": self.images, "shard_size": self.shard_size,
                   "base": self.base, "vary": self.vary, "float": self.float_out, "counts": self.counts,
                   "jacobian": self.jacobian, "compression": self.compression}
        if self.precision != "float64":      # (datasets made before the field keep their identity)
            content["precision"] = self.precision
        return json.dumps(content, sort_keys=True)

    def digest(self):
        cached = self.__dict__.get("_digest")
        if cached is not None:
            return cached
        h = hashlib.sha256(self.canonical().encode())
        for tok in self.base:   # the content of input files the base names
            p = os.path.join(self.base_dir, tok)
            if os.path.isfile(p) and not tok.startswith("-"):
                with open(p, "rb") as fh:
                    h.update(fh.read())
        self.__dict__["_digest"] = h.hexdigest()[:16]
        return self.__dict__["_digest"]

    @property
    def nshards(self):
        return -(-self.images // self.shard_size)

    def varied_names(self):
        from .params import SCALAR_PARAMS
        return [n for n in SCALAR_PARAMS if n in self.vary]


def _spec_error(msg):
    raise DatasetError(f"dataset spec: {msg}")


def load_spec(source, base_dir=None):
    """A :class:`DatasetSpec` from a YAML/JSON file path or a dict."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        try:
            with open(path) as fh:
                text = fh.read()
        except OSError as exc:
            raise InputFileError(f"dataset spec {path!r} cannot be read: {exc.strerror}") from None
        if path.endswith((".yaml", ".yml")):
            try:
                import yaml
            except ImportError:  # pragma: no cover - yaml comes with the dataset extra
                raise DatasetError("reading a YAML spec needs PyYAML (pip install pyyaml), or use JSON") from None
            try:
                raw = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise InputFileError(f"dataset spec {path!r} is not valid YAML: {exc}") from None
        else:
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as exc:
                raise InputFileError(f"dataset spec {path!r} is not valid JSON: {exc}") from None
        base_dir = base_dir or os.path.dirname(os.path.abspath(path))
    else:
        raw = source
        base_dir = base_dir or os.getcwd()
    if not isinstance(raw, dict):
        _spec_error("expected a mapping at the top level")
    known = {"seed", "images", "shard_size", "base", "vary", "outputs", "compression", "precision"}
    for k in raw:
        if k not in known:
            _spec_error(f"unknown field {k!r} (known: {', '.join(sorted(known))})")

    def integer(name, default=None, minimum=None):
        v = raw.get(name, default)
        if v is None:
            _spec_error(f"field {name!r} is required")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
            _spec_error(f"{name} = {v!r} is not an integer")
        if minimum is not None and v < minimum:
            _spec_error(f"{name} = {v!r} must be at least {minimum}")
        return int(v)

    seed = integer("seed", 0, 0)
    images = integer("images", None, 1)
    shard_size = integer("shard_size", min(images, 100), 1)
    base = raw.get("base")
    if isinstance(base, str):
        base = base.split()
    if not isinstance(base, list) or not base or not all(isinstance(t, (str, int, float)) for t in base):
        _spec_error("base must be a nanoBragg command line (a string or a list of arguments)")
    base = [str(t) for t in base]
    vary = raw.get("vary") or {}
    if not isinstance(vary, dict):
        _spec_error("vary must be a mapping of parameter: distribution")
    vary = dict(vary)
    if "cell_jitter" in vary:
        try:
            r = _number(vary.pop("cell_jitter"))
        except ValueError:
            _spec_error("vary.cell_jitter must be a number")
        for n in ("cell_a", "cell_b", "cell_c"):
            vary.setdefault(n, {"jitter": r})
    from .params import SCALAR_PARAMS
    for name, dist in vary.items():
        if name == "orientation":
            if dist not in ("uniform", None, False):
                _spec_error(f"vary.orientation = {dist!r}: only 'uniform' is known")
            continue
        if name not in SCALAR_PARAMS:
            _spec_error(f"vary.{name}: unknown parameter (choose from orientation, cell_jitter, "
                        f"{', '.join(SCALAR_PARAMS)})")
        vary[name] = dist = _normalise_dist(name, dist)
        _check_dist(name, dist)
    outputs = raw.get("outputs") or {}
    if not isinstance(outputs, dict):
        _spec_error("outputs must be a mapping")
    for k in outputs:
        if k not in ("float", "counts", "jacobian"):
            _spec_error(f"outputs.{k}: unknown (known: float, counts, jacobian)")
    float_out = bool(outputs.get("float", True))
    counts = outputs.get("counts", "uint16")
    if counts in (None, False, "none"):
        counts = None
    elif counts not in COUNT_TYPES:
        _spec_error(f"outputs.counts = {counts!r}: choose uint16, uint32 or none")
    if not float_out and counts is None:
        _spec_error("outputs: ask for float photons, counts, or both")
    jac = outputs.get("jacobian") or []
    if isinstance(jac, str):
        jac = [jac]
    for n in jac:
        if n not in SCALAR_PARAMS:
            _spec_error(f"outputs.jacobian: unknown parameter {n!r}")
    compression = raw.get("compression", "bitshuffle")
    if compression not in ("bitshuffle", "gzip", "none"):
        _spec_error(f"compression = {compression!r}: choose bitshuffle, gzip or none")
    precision = raw.get("precision", "float64")
    if precision not in ("float64", "float32"):
        _spec_error(f"precision = {precision!r}: choose float64 or float32")
    return DatasetSpec(seed=seed, images=images, shard_size=shard_size, base=base, base_dir=base_dir, vary=vary,
                       float_out=float_out, counts=counts, jacobian=list(jac), compression=compression,
                       precision=precision)


def _number(v):
    """A float from a number or a numeric string (YAML reads 1e28 as a string)."""
    if isinstance(v, bool):
        raise ValueError(v)
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        return float(v)
    raise ValueError(v)


def _normalise_dist(name, dist):
    """Numbers in a distribution as floats; clear errors otherwise."""
    try:
        if not isinstance(dist, dict):
            return _number(dist)
        return {k: ([_number(x) for x in v] if isinstance(v, list) else _number(v)) for k, v in dist.items()}
    except ValueError:
        _spec_error(f"vary.{name} = {dist!r}: values must be numbers")


def _check_dist(name, dist):
    if isinstance(dist, (int, float)) and not isinstance(dist, bool):
        return
    if not isinstance(dist, dict) or len(dist) != 1:
        _spec_error(f"vary.{name} = {dist!r}: expected a number or one of "
                    + ", ".join("{%s: ...}" % k for k in DIST_KINDS))
    kind, arg = next(iter(dist.items()))
    if kind not in DIST_KINDS:
        _spec_error(f"vary.{name}: unknown distribution {kind!r} (choose from {', '.join(DIST_KINDS)})")
    if kind == "jitter":
        if not isinstance(arg, (int, float)) or arg < 0:
            _spec_error(f"vary.{name}.jitter = {arg!r} must be a non-negative number")
    elif kind == "choice":
        if not isinstance(arg, list) or not arg:
            _spec_error(f"vary.{name}.choice must be a non-empty list")
    else:
        if not (isinstance(arg, list) and len(arg) == 2 and all(isinstance(v, (int, float)) for v in arg)):
            _spec_error(f"vary.{name}.{kind} = {arg!r}: expected two numbers")
        if kind in ("uniform", "loguniform", "integers") and not arg[0] <= arg[1]:
            _spec_error(f"vary.{name}.{kind} = {arg!r}: the lower bound is above the upper")
        if kind == "loguniform" and arg[0] <= 0:
            _spec_error(f"vary.{name}.loguniform needs positive bounds")
        if kind == "normal" and arg[1] < 0:
            _spec_error(f"vary.{name}.normal: negative sd")


# ----------------------------------------------------------------------------- frames

_BASE_CACHE = {}


def base_experiment(spec):
    """The spec's base Experiment (parsed once per process)."""
    key = (spec.digest(), spec.base_dir)
    if key not in _BASE_CACHE:
        from .nbargs import parse_nanobragg_args
        parsed = parse_nanobragg_args(spec.base, cwd=spec.base_dir, warn=lambda m: None)
        _BASE_CACHE[key] = parsed.experiment
    return _BASE_CACHE[key]


def _draw(dist, base_value, rng):
    if not isinstance(dist, dict):
        return float(dist)
    kind, arg = next(iter(dist.items()))
    if kind == "uniform":
        return float(rng.uniform(arg[0], arg[1]))
    if kind == "normal":
        return float(rng.normal(arg[0], arg[1]))
    if kind == "jitter":
        return float(base_value * (1.0 + rng.normal(0.0, arg)))
    if kind == "loguniform":
        return float(math.exp(rng.uniform(math.log(arg[0]), math.log(arg[1]))))
    if kind == "integers":
        return float(rng.integers(int(arg[0]), int(arg[1]) + 1))
    return float(arg[int(rng.integers(0, len(arg)))])


def frame_parameters(spec, base, index):
    """(values: {name: float}, orientation 3x3) for frame ``index`` -- deterministic."""
    from .params import get_params
    rng = np.random.default_rng([spec.seed, index])
    orientation = np.eye(3)
    if spec.vary.get("orientation") == "uniform":
        from scipy.spatial.transform import Rotation
        orientation = Rotation.random(random_state=rng).as_matrix()
    names = spec.varied_names()
    base_values = get_params(base, names)
    values = {n: _draw(spec.vary[n], base_values[n], rng) for n in names}
    return values, orientation


def frame_experiment(base, values, orientation):
    """The Experiment of one frame: the base with ``values`` set and ``orientation``
    applied before the base orientation's misset."""
    from .params import set_params
    exp = set_params(base, values) if values else base
    if orientation is not None and not np.allclose(orientation, np.eye(3)):
        U0 = np.eye(3) if exp.crystal.orientation is None else np.asarray(exp.crystal.orientation)
        exp = exp.replace(crystal=exp.crystal.replace(orientation=np.asarray(orientation) @ U0))
    return exp


def simulate_frame(spec, index, threads=None, backend="cpu"):
    """Simulate frame ``index``: a dict of arrays (images, parameters)."""
    from .engine import simulate
    base = base_experiment(spec)
    values, orientation = frame_parameters(spec, base, index)
    try:
        exp = frame_experiment(base, values, orientation)
    except NbraggError as exc:
        raise DatasetError(f"frame {index}: the drawn parameters make no valid experiment: {exc}") from None
    image = simulate(exp, backend=backend, threads=threads, warn=lambda m: None, precision=spec.precision).image
    out = {"params": np.array([values[n] for n in spec.varied_names()], dtype=np.float64),
           "orientation": orientation}
    if spec.float_out:
        out["photons"] = image.astype(np.float32)
    if spec.counts:
        rng = np.random.default_rng([spec.seed, index, 1])
        cnt = rng.poisson(np.clip(image, 0.0, None))
        out["counts"] = np.minimum(cnt, np.iinfo(COUNT_TYPES[spec.counts]).max).astype(COUNT_TYPES[spec.counts])
    if spec.jacobian:
        from .gradients import jacobian
        J = jacobian(exp, spec.jacobian, threads=threads, backend=backend)
        out["jacobian"] = J.reshape(image.shape + (len(spec.jacobian),)).transpose(2, 0, 1).astype(np.float32)
    return out


# ----------------------------------------------------------------------------- files

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
    from .engine import build_model
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
                    if jac is not None:
                        for q, nm in enumerate(spec.jacobian):
                            jac[nm][j] = z["jacobian"][q]
                completed[j] = 1      # after the frame's data
            from .io.nexus import write_nxmx
            write_nxmx(entry, model, n)
    for i in frames:
        try:
            os.unlink(paths.frame(i))
        except OSError:
            pass
    return k


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
    from .engine import build_model
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
            from .io.nexus import write_nxmx
            write_nxmx(entry, model, N)
    return paths.master


# ----------------------------------------------------------------------------- driver

def _check_output(spec, output):
    paths = _Paths(output)
    folder = os.path.dirname(paths.master)
    if not os.path.isdir(folder):
        raise DatasetError(f"output folder {folder!r} does not exist")
    if os.path.exists(paths.master):
        import h5py
        try:
            with h5py.File(paths.master, "r", locking=False) as fh:
                d = fh["entry/nbragg"].attrs.get("spec_digest")
        except Exception:
            raise DatasetError(f"{paths.master} exists and is not an nbragg dataset; not overwriting it") from None
        if d != spec.digest():
            raise DatasetError(f"{paths.master} was made from a different spec; not overwriting it")
    os.makedirs(paths.staging, exist_ok=True)
    _remove_partials(paths)
    return paths


def _remove_partials(paths):
    """Temporary files a killed run left behind (never a committed frame or shard)."""
    import glob
    stale = glob.glob(partial_name_pattern(os.path.join(glob.escape(paths.staging), "frame*.npz")))
    stale += glob.glob(partial_name_pattern(glob.escape(paths.stem) + "_shard*.h5"))
    stale += glob.glob(partial_name_pattern(glob.escape(paths.master)))
    for f in stale:
        try:
            os.unlink(f)
        except OSError:
            pass


def generate(spec, output, workers=None, scheduler=None, progress=True, threads_per_worker=1, on_frame=None,
             backend="cpu"):
    """Generate (or finish) the dataset ``spec`` into ``output`` (the master .h5 path).

    Parameters
    ----------
    spec : DatasetSpec, a dict, or a path to a YAML/JSON spec
    output : master file path; shards and the staging folder go beside it
    workers : None -- a local Dask cluster with one worker per core (Dask installed), or
        in this process otherwise; 0 -- in this process, with every core's Numba thread;
        1 -- in this process with ``threads_per_worker`` threads (a cluster of one worker
        would only add overhead); n > 1 -- a local cluster of n worker processes
    scheduler : address of an existing dask.distributed scheduler (its workers need
        nbragg and access to the output folder)
    progress : a tqdm bar over frames
    threads_per_worker : Numba threads in each worker
    on_frame : optional callable(index), called as each frame is committed
    backend : "cpu", or "cuda" to simulate on a GPU (with workers 0 or 1; each Dask
        worker would need a GPU of its own)

    Returns the master file path.
    """
    from .engine import check_backend
    check_backend(backend)
    if not isinstance(spec, DatasetSpec):
        spec = load_spec(spec)
    base_experiment(spec)           # fail early on a bad base
    paths = _check_output(spec, output)
    pending_shards = [k for k in range(spec.nshards) if not _shard_valid(spec, paths.shard(k))]
    todo = [i for k in pending_shards for i in _shard_frames(spec, k) if not os.path.exists(paths.frame(i))]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=spec.images, initial=spec.images - len(todo), unit="frame", desc="nbragg-dataset",
                   file=sys.stderr)
    try:
        if scheduler is None and workers is None and backend != "cpu":
            workers = 0
        if scheduler is None and workers is None:
            try:
                import distributed  # noqa: F401
                workers = os.cpu_count() or 1
            except ImportError:
                workers = 0
        if scheduler is None and workers in (0, 1):
            threads = None if workers == 0 else threads_per_worker
            for k in pending_shards:
                kept = {}
                for i in _shard_frames(spec, k):
                    if not os.path.exists(paths.frame(i)):
                        stage_frame(spec, paths.master, i, threads=threads, keep=kept, backend=backend)
                        if bar is not None:
                            bar.update(1)
                        if on_frame is not None:
                            on_frame(i)
                assemble_shard(spec, paths.master, k, kept=kept)
        else:
            if backend != "cpu":
                raise DatasetError(f"backend {backend!r} runs in this process: use --workers 0 or 1")
            _generate_dask(spec, paths, pending_shards, todo, workers, scheduler, bar, threads_per_worker, on_frame)
    finally:
        if bar is not None:
            bar.close()
    write_master(spec, paths.master)
    try:
        os.rmdir(paths.staging)
    except OSError:
        pass
    return paths.master


def make_shard(spec, output, k, threads=None):
    """Stage every missing frame of shard ``k`` (each committed on its own), then
    assemble the shard.  One Dask task."""
    paths = _Paths(output)
    if _shard_valid(spec, paths.shard(k)):
        return k
    kept = {}
    for i in _shard_frames(spec, k):
        stage_frame(spec, output, i, threads=threads, keep=kept)
    return assemble_shard(spec, output, k, kept=kept)


def _generate_dask(spec, paths, pending_shards, todo, workers, scheduler, bar, threads_per_worker, on_frame):
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError:
        what = f"--scheduler {scheduler}" if scheduler is not None else f"--workers {workers}"
        raise DatasetError(f"{what} needs dask.distributed (pip install \"nbragg[dataset]\"); "
                           "--workers 0 runs in this process without it") from None
    cluster = None
    if scheduler is None:
        cluster = LocalCluster(n_workers=int(workers), threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    else:
        client = Client(scheduler)
    try:
        # one task per shard: few scheduler round trips; frames still commit one by one.
        # Numba's thread count is per calling thread, so each task sets it for itself.
        staged = set(range(spec.images)) - set(todo)
        futures = [client.submit(make_shard, spec, paths.master, k, threads=threads_per_worker, pure=False,
                                 key=f"nbragg-shard-{paths.digest_key}-{k}") for k in pending_shards]
        for fut in as_completed(futures):
            k = fut.result()
            new = [i for i in _shard_frames(spec, k) if i not in staged]
            if bar is not None:
                bar.update(len(new))
            if on_frame is not None:
                for i in new:
                    on_frame(i)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def read_frame(output, index, dataset="data"):
    """One frame from a generated dataset (via the master's virtual dataset)."""
    import h5py
    with h5py.File(output, "r", locking=False) as fh:
        return fh["entry/data/" + dataset][index]


def read_parameters(output):
    """{name: array over frames} and the orientations from a generated dataset."""
    import h5py
    with h5py.File(output, "r", locking=False) as fh:
        nb = fh["entry/nbragg"]
        spec = json.loads(nb.attrs["spec"])
        out = {}
        for k in nb:
            if isinstance(nb[k], h5py.Dataset) and k not in ("orientation", "completed", "frame_index"):
                out[k] = nb[k][()]
        return out, nb["orientation"][()], spec


def main(argv=None):
    """``nbragg-dataset SPEC -o OUTPUT.h5 [--workers N] [--scheduler ADDRESS] [--noprogress]``."""
    import argparse
    ap = argparse.ArgumentParser(prog="nbragg-dataset", description="Generate an HDF5/NXmx dataset of simulated frames.")
    ap.add_argument("spec", help="dataset spec (YAML or JSON)")
    ap.add_argument("-o", "--output", required=True, help="master HDF5 file; shards are written beside it")
    ap.add_argument("--workers", type=int, default=None,
                    help="local Dask workers (default: one per core; 0: in this process)")
    ap.add_argument("--scheduler", help="address of an existing dask.distributed scheduler")
    ap.add_argument("--threads-per-worker", type=int, default=1)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: simulate on an NVIDIA GPU (with --workers 0 or 1)")
    ap.add_argument("--noprogress", action="store_true")
    argv = sys.argv[1:] if argv is None else argv
    try:
        opts = ap.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        out = generate(opts.spec, opts.output, workers=opts.workers, scheduler=opts.scheduler,
                       progress=not opts.noprogress, threads_per_worker=opts.threads_per_worker,
                       backend=opts.device)
    except NbraggError as exc:
        print("nbragg-dataset: error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
