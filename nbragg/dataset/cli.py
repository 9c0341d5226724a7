"""The ``nbragg-dataset`` command."""

from __future__ import annotations

import sys

from ..errors import NbraggError, report
from .schedule import generate



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
    from .. import __version__
    ap.add_argument("--version", action="version", version=f"nbragg-dataset {__version__}")
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
        return report("nbragg-dataset", exc)
    print(f"wrote {out}")
    return 0

