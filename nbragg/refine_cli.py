"""``nbragg-refine``: fit a nanoBragg model to an observed image.

Usage::

    nbragg-refine OBSERVED --refine cell_a,cell_b,misset_z [options] -- <nanoBragg arguments>

OBSERVED is an SMV image (the ``--adc`` offset, 40 by default as nanoBragg writes, is
subtracted and saturated pixels are left out), an HDF5 file (``--dataset``, ``--frame``),
or raw little-endian float32 photons.  The nanoBragg arguments after ``--`` describe
the starting model.  The report (``--report``, JSON) holds the refined values, their
uncertainties, the loss history and the number of evaluations, and the refined model as
a nanoBragg command line (with an A matrix file beside the report when the crystal was
refined).  Errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from .errors import ArgumentError, InputFileError, console_main

SATURATED = 65535


def read_observed(path, shape, adc=40.0, dataset="/entry/data/data", frame=0):
    """Observed photons (float64, ``shape``) and a mask of usable pixels."""
    if not os.path.exists(path):
        raise InputFileError(f"observed image {path!r} does not exist")
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head.startswith(b"{\nHEADER_BYT") and len(shape) == 2:
        from .io.smv import read_smv
        img = read_smv(path, what="observed")
        if img.data.shape != shape:
            raise InputFileError(f"observed image {path!r} is {img.data.shape[1]}x{img.data.shape[0]} pixels; "
                                 f"the model's detector is {shape[1]}x{shape[0]}")
        raw = img.data.astype(np.float64)
        mask = raw < SATURATED
        obs = raw - float(adc)
        if np.any(obs[mask] < 0):
            raise InputFileError(f"observed image {path!r}: values below the ADC offset {adc:g} (use --adc)")
        return np.maximum(obs, 0.0), mask
    if head.startswith(b"\x89HDF"):
        import h5py
        try:
            with h5py.File(path, "r") as fh:
                if dataset not in fh:
                    raise InputFileError(f"observed image {path!r} has no dataset {dataset!r} (use --dataset)")
                d = fh[dataset]
                # a stack of frames, or one frame
                data = d[frame] if d.ndim == len(shape) + 1 else d[()]
        except OSError as exc:
            raise InputFileError(f"observed image {path!r} cannot be read: {exc}") from None
        except IndexError:
            raise InputFileError(f"observed image {path!r}: frame {frame} is out of range") from None
        data = np.asarray(data, dtype=np.float64)
        if data.shape != shape:
            raise InputFileError(f"observed image {path!r}: frame shape {data.shape}, model {shape}")
        return data, np.isfinite(data)
    raw = np.fromfile(path, dtype="<f4")
    if raw.size != int(np.prod(shape)):
        raise InputFileError(f"observed image {path!r} holds {raw.size} floats; the model's detector has "
                             f"{int(np.prod(shape))} pixels" + (f" ({shape[0]} panels)" if len(shape) == 3 else ""))
    data = raw.reshape(shape).astype(np.float64)
    return data, np.isfinite(data)


# flags (and how many values follow) that a refined parameter replaces
_CRYSTAL_FLAGS = {"-cell": 6, "-mat": 1, "-misset": 3}
_PARAM_FLAGS = {
    "Na": {"-Na": 1}, "Nb": {"-Nb": 1}, "Nc": {"-Nc": 1},
    "wavelength": {"-lambda": 1, "-wave": 1, "-wavelength": 1, "-energy": 1},
    "fluence": {"-fluence": 1, "-flux": 1, "-exposure": 1, "-beamsize": 1},
    "detector_rotx": {"-detector_rotx": 1}, "detector_roty": {"-detector_roty": 1},
    "detector_rotz": {"-detector_rotz": 1}, "twotheta": {"-twotheta": 1},
    "mosaic_spread": {"-mosaic": 1, "-mosaic_spread": 1}, "phi0": {"-phi": 1}, "osc": {"-osc": 1},
    "polar": {"-polar": 1}, "water": {"-water": 1},
}


def _strip(args, flags):
    out = []
    i = 0
    while i < len(args):
        a = args[i]
        if a in flags:
            n = flags[a]
            if a == "-misset" and i + 1 < len(args) and "rand" in args[i + 1]:
                n = 1
            j = i + 1
            while j < len(args) and j <= i + n:
                if args[j].startswith("-") and not _numeric(args[j]):
                    break
                j += 1
            i = j
            continue
        out.append(a)
        i += 1
    return out


def _numeric(s):
    try:
        float(s)
        return True
    except ValueError:
        return False


def write_mat(path, exp):
    """A MOSFLM-style A matrix (reciprocal vectors times the wavelength) for ``exp``."""
    from .engine import build_model
    from .io.atomic import atomic_write
    model = build_model(exp, warn=lambda m: None)
    recip = model.crystal.recip0 * exp.beam.wavelength     # rows a*, b*, c* (1/A) times lambda
    lines = ["%.15g %.15g %.15g" % tuple(recip[:, i]) for i in range(3)]
    atomic_write(path, ("\n".join(lines) + "\n").encode())


def refined_args(args, fit, exp, matfile):
    """The nanoBragg argument list of the refined model."""
    names = set(fit.names)
    out = list(args)
    crystal = names & {"cell_a", "cell_b", "cell_c", "cell_alpha", "cell_beta", "cell_gamma", "misset_x",
                       "misset_y", "misset_z"}
    if crystal:
        out = _strip(out, _CRYSTAL_FLAGS)
        out += ["-mat", matfile]
    if names & {"Na", "Nb", "Nc"}:
        out = _strip(out, {"-N": 1, "-Na": 1, "-Nb": 1, "-Nc": 1})
        # nanoBragg takes whole numbers of cells: the command line gets the nearest
        # integers (the report keeps the refined, continuous values)
        c = exp.crystal
        out += ["-Na", "%d" % round(c.Na), "-Nb", "%d" % round(c.Nb), "-Nc", "%d" % round(c.Nc)]
    for n in names:
        if n in _PARAM_FLAGS and n not in ("Na", "Nb", "Nc"):
            out = _strip(out, _PARAM_FLAGS[n])
            flag = next(iter(_PARAM_FLAGS[n]))
            out += [flag, "%.10g" % fit.values[n]]
    d = exp.detector
    if "distance" in names:
        out = _strip(out, {"-distance": 1, "-close_distance": 1})
        if d.close_distance is not None:
            out += ["-close_distance", "%.10g" % d.close_distance]
        else:
            out += ["-distance", "%.10g" % d.distance]
    if names & {"beam_x", "beam_y"}:
        if d.convention in ("xds", "dials"):
            out = _strip(out, {"-ORGX": 1, "-ORGY": 1})
            out += ["-ORGX", "%.10g" % d.orgx, "-ORGY", "%.10g" % d.orgy]
        else:
            from .params import get_params
            b = get_params(exp, ["beam_x", "beam_y"])
            out = _strip(out, {"-Xbeam": 1, "-Ybeam": 1})
            out += ["-Xbeam", "%.10g" % b["beam_x"], "-Ybeam", "%.10g" % b["beam_y"]]
    return out


def _parser():
    ap = argparse.ArgumentParser(
        prog="nbragg-refine", description="Refine nanoBragg model parameters against an observed image.",
        epilog="Everything after -- is the starting model, as nanoBragg arguments.")
    ap.add_argument("observed", help="observed image: SMV, HDF5, or raw float32")
    ap.add_argument("--refine", required=True, help="comma-separated parameter names")
    ap.add_argument("--loss", default="poisson", choices=["poisson", "gaussian", "l2"])
    ap.add_argument("--method", default="least_squares", choices=["least_squares", "lbfgs"])
    ap.add_argument("--readout", type=float, default=0.0, help="readout noise (photons) for the gaussian loss")
    ap.add_argument("--adc", type=float, default=40.0, help="ADC offset subtracted from SMV images (default 40)")
    ap.add_argument("--dataset", default="/entry/data/data", help="HDF5 dataset of the observed frames")
    ap.add_argument("--frame", type=int, default=0, help="frame index in an HDF5 stack")
    ap.add_argument("--stages", help="groups refined in turn before the joint fit, e.g. 'misset_x,misset_y;Na,Nb'")
    ap.add_argument("--blur", default="4,2,1", help="coarse-to-fine Gaussian widths in pixels ('' for none)")
    ap.add_argument("--check-gradients", action="store_true", help="check derivatives against finite differences")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where images and derivatives are computed (cuda: an NVIDIA GPU)")
    ap.add_argument("--report", default="refine.json", help="JSON report (default refine.json)")
    ap.add_argument("--expt-out", dest="expt_out", default=None,
                    help="refined DIALS experiment list (default with -expt in the model: the report's name "
                         "with .expt)")
    from . import __version__
    ap.add_argument("--version", action="version", version=f"nbragg-refine {__version__}")
    return ap


def run(argv, stdout=None):
    from .nbargs import parse_nanobragg_args
    from .refine import refine
    out = stdout or sys.stdout
    argv = list(argv)
    ap = _parser()
    if "--" not in argv:
        if any(a in ("-h", "--help", "--version") for a in argv):
            try:
                ap.parse_args([a for a in argv if a in ("-h", "--help", "--version")])
            except SystemExit as exc:
                return int(exc.code or 0)
        raise ArgumentError("give the starting model after '--' (nanoBragg arguments); see nbragg-refine --help")
    k = argv.index("--")
    own, nb_args = argv[:k], argv[k + 1:]
    try:
        opts = ap.parse_args(own)
    except SystemExit as exc:
        if exc.code == 0:
            return 0
        raise ArgumentError("bad options (see nbragg-refine --help)") from None
    names = [n.strip() for n in opts.refine.split(",") if n.strip()]
    stages = None
    if opts.stages:
        stages = [[n.strip() for n in grp.split(",") if n.strip()] for grp in opts.stages.split(";") if grp.strip()]
    try:
        blur = [float(b) for b in opts.blur.split(",") if b.strip()] if opts.blur else None
    except ValueError:
        raise ArgumentError(f"--blur: {opts.blur!r} is not a list of widths") from None
    from .io.atomic import check_output_path
    check_output_path(opts.report, "--report")
    if opts.expt_out:
        check_output_path(opts.expt_out, "--expt-out")
    parsed = parse_nanobragg_args(nb_args, warn=lambda m: print(f"WARNING: {m}", file=sys.stderr))
    exp = parsed.experiment
    shape = (exp.detector.spixels, exp.detector.fpixels)
    if exp.detector.panels is not None and len(exp.detector.panels) > 1:
        shape = (len(exp.detector.panels),) + shape
    obs, usable = read_observed(opts.observed, shape, adc=opts.adc, dataset=opts.dataset, frame=opts.frame)
    fit = refine(exp, obs, names, loss=opts.loss, method=opts.method, mask=usable, stages=stages, blur=blur,
                 readout=opts.readout, check_gradients=opts.check_gradients, threads=opts.threads,
                 backend=opts.device)
    print(fit.table(), file=out)
    base = os.path.splitext(opts.report)[0]
    matfile = base + ".mat"
    crystal = {"cell_a", "cell_b", "cell_c", "cell_alpha", "cell_beta", "cell_gamma", "misset_x", "misset_y",
               "misset_z"} & set(names)
    if crystal:
        write_mat(matfile, fit.experiment)
    new_args = refined_args(nb_args, fit, fit.experiment, matfile)
    report = {
        "observed": opts.observed, "parameters": fit.names, "loss": fit.loss, "method": fit.method,
        "start": fit.start, "values": fit.values, "uncertainties": fit.uncertainties,
        "success": fit.success, "message": fit.message, "at_bounds": fit.at_bounds,
        "nfev": fit.nfev, "njev": fit.njev,
        "final_loss": fit.final_loss, "loss_history": fit.history, "wall_time_s": fit.wall_time,
        "nanobragg_args": new_args, "mat_file": matfile if crystal else None,
    }
    from .io.dials import DialsSource
    source = exp.provenance
    if isinstance(source, DialsSource):
        # the refined experiment in its list, the others as they were
        from .io.dials import write_refined
        expt_out = opts.expt_out or base + ".expt"
        write_refined(expt_out, fit.experiment)
        report["experiment_list"] = expt_out
        new_args = [expt_out if k > 0 and new_args[k - 1] == "-expt" else a for k, a in enumerate(new_args)]
        report["nanobragg_args"] = new_args
        print(f"refined experiment list written to {expt_out}", file=out)
    elif opts.expt_out:
        from .io.dials import write_experiments
        write_experiments(opts.expt_out, [fit.experiment])
        report["experiment_list"] = opts.expt_out
    from .io.atomic import atomic_write
    atomic_write(opts.report, (json.dumps(report, indent=1, default=_json_default) + "\n").encode())
    print("refined model: nbragg " + " ".join(new_args), file=out)
    print(f"report written to {opts.report}", file=out)
    return 0


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(type(x))


def main(argv=None):
    """Console entry point."""
    return console_main("nbragg-refine", run, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
