"""Making a dataset: which frames and shards are left, in-process or on Dask workers,
resumable."""

from __future__ import annotations

import os
import sys

from ..io.atomic import partial_name_pattern
from .frames import base_experiment
from .layout import _Paths, _shard_frames, _shard_valid, assemble_shard, stage_frame, write_master
from .spec import DatasetError, DatasetSpec, load_spec



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
    from ..engine import check_backend
    check_backend(backend)
    for name, value, least in (("workers", workers, 0), ("threads_per_worker", threads_per_worker, 1)):
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                  or int(value) != value or value < least):
            raise DatasetError(f"--{name.replace('_', '-')} {value!r}: give a whole number of at least {least}"
                               + (" (0 runs in this process)" if name == "workers" else ""))
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
