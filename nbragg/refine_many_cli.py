"""``nbragg-refine-many``: refine structure factors and models over many shots.

Usage::

    nbragg-refine-many SPEC [--dataset FILE] [--output STEM] [--workers N] [--checkpoint DIR]

SPEC (YAML or JSON; paths relative to it) names the shots, the starting models and what to
refine::

    shots:
      dataset: stills.h5          # an nbragg-dataset file: frame i's image and experiment
      images: data                # data (counts, the default) or photons
      frames: [0, 200]            # optional range
    # or shots: [{image: a.img, args: "-mat A.mat -hkl P1.hkl ..."}, ...]  (SMV, ADC 40)
    start:                        # optional
      hkl: start.hkl              # starting structure factors (HKL, or MTZ with a column)
      set: {distance: 80.4}       # starting values of shared parameters
      perturb: {seed: 7, Fhkl: 0.3, misset: 0.05, relative: {Na: 0.1}}
                                  # a recovery study: start away from the dataset's values
                                  # (which are then the truth the report compares with)
    shared: [Fhkl, cell_a, cell_c, distance]
    per_shot: [misset_x, misset_y, misset_z, Na, Nb, Nc, scale]
    space_group: P 43 21 2
    loss: poisson                 # or l2
    method: gauss_newton          # or lbfgs
    stages: [[misset_x, misset_y, misset_z, Na, Nb, Nc, scale]]   # refined first, then all
    restraints: {scale: [1.0, 0.1]}
    bounds: {distance: [70, 90]}
    min_observations: 1
    workers: 2                    # 0: in this process
    max_iterations: 30
    checkpoint: run.ckpt          # resume a killed run
    output: refined               # refined.hkl, refined.mtz (gemmi), refined.json

The report (JSON) holds the shared values and uncertainties, every shot's values and
uncertainties (or why it was dropped), the loss history and, for a recovery study, the
errors against the truth.  Errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from .errors import ArgumentError, InputFileError, NbraggError, ParameterError, console_main

_KNOWN = {"shots", "start", "shared", "per_shot", "space_group", "loss", "method", "restraints", "bounds",
          "min_observations", "min_photons", "workers", "threads_per_worker", "max_iterations", "checkpoint",
          "output", "scheduler", "progress", "ftol", "atol", "gtol", "damping", "stages"}


class SpecError(InputFileError):
    """A refine-many spec that cannot be used."""


def _fail(path, msg):
    raise SpecError(f"{path}: {msg}")


def load_spec(path):
    if not os.path.exists(path):
        raise SpecError(f"spec {path!r} does not exist")
    with open(path) as fh:
        text = fh.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise SpecError("reading a YAML spec needs PyYAML (pip install pyyaml), or use JSON") from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SpecError(f"{path}: not valid YAML: {exc}") from None
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"{path}: not valid JSON: line {exc.lineno}: {exc.msg}") from None
    if not isinstance(raw, dict):
        _fail(path, "expected a mapping at the top level")
    for k in raw:
        if k not in _KNOWN:
            _fail(path, f"unknown field {k!r} (known: {', '.join(sorted(_KNOWN))})")
    for k in ("shots", "shared", "per_shot"):
        if k not in raw and k != "shared" and k != "per_shot":
            _fail(path, f"missing field {k!r}")
    if "shots" not in raw:
        _fail(path, "missing field 'shots'")
    for k in ("shared", "per_shot"):
        v = raw.get(k, [])
        if not isinstance(v, list) or not all(isinstance(n, str) for n in v):
            _fail(path, f"{k} = {v!r}: expected a list of parameter names")
    return raw


# ----------------------------------------------------------------------------- shots

def _dataset_shots(spec_path, entry, base_dir, override):
    from .dataset.frames import base_experiment, frame_experiment
    from .dataset.layout import open_dataset, read_parameters
    from .dataset.stream import _spec_from_stored
    from .refine_many import FrameRef
    path = override or entry.get("dataset")
    if not path:
        _fail(spec_path, "shots.dataset: no dataset file given")
    path = os.path.join(base_dir, path) if not override else path
    if not os.path.exists(path):
        _fail(spec_path, f"shots.dataset: {path!r} does not exist (make it with nbragg-dataset)")
    images = entry.get("images", "data")
    with open_dataset(path) as fh:
        if "entry/nbragg" not in fh or "spec" not in fh["entry/nbragg"].attrs:
            _fail(spec_path, f"shots.dataset: {path!r} is not an nbragg-dataset file")
        if f"entry/data/{images}" not in fh:
            _fail(spec_path, f"shots.images = {images!r}: {path!r} has no entry/data/{images}")
        stored = fh["entry/nbragg"].attrs["spec"]
        nframes = fh[f"entry/data/{images}"].shape[0]
    dspec = _spec_from_stored(stored if isinstance(stored, str) else stored.decode())
    dspec.base_dir = base_dir
    values, orientations, _ = read_parameters(path)
    frames = entry.get("frames", [0, nframes])
    if (not isinstance(frames, list) or len(frames) != 2 or not all(isinstance(v, int) for v in frames)
            or not 0 <= frames[0] < frames[1] <= nframes):
        _fail(spec_path, f"shots.frames = {frames!r}: expected [start, stop] within 0..{nframes}")
    try:
        base = base_experiment(dspec)
    except NbraggError as exc:
        _fail(spec_path, f"shots.dataset {path!r}: its base experiment cannot be made here ({exc}); the base's "
                         f"input files are looked for beside the spec")
    names = dspec.experiment_names()
    exps, obs = [], []
    for i in range(*frames):
        v = {n: float(values[n][i]) for n in names if n in values}
        exps.append(frame_experiment(base, v, orientations[i], dspec, i))
        obs.append(FrameRef(path, i, images))
    return exps, obs


def _image_shots(spec_path, entries, base_dir):
    from .nbargs import parse_nanobragg_args
    from .refine_cli import read_observed
    exps, obs, masks = [], [], []
    for k, e in enumerate(entries):
        if not isinstance(e, dict) or "image" not in e or "args" not in e:
            _fail(spec_path, f"shots[{k}]: expected {{image: FILE, args: \"nanoBragg arguments\"}}")
        try:
            parsed = parse_nanobragg_args(str(e["args"]).split(), cwd=base_dir, warn=lambda m: None)
        except NbraggError as exc:
            _fail(spec_path, f"shots[{k}].args: {exc}")
        exp = parsed.experiment
        o, m = read_observed(os.path.join(base_dir, e["image"]), (exp.detector.spixels, exp.detector.fpixels))
        exps.append(exp)
        obs.append(o)
        masks.append(m)
    return exps, obs, masks


# ----------------------------------------------------------------------------- starting models

def _start_grid(spec_path, start, exps, base_dir):
    """The shots with the starting structure factors of start.hkl (HKL, or MTZ) written
    into their grid."""
    src = start.get("hkl")
    if src is None:
        return exps
    path = os.path.join(base_dir, src)
    if path.lower().endswith(".mtz"):
        from .io.reflections import read_mtz
        data = read_mtz(path, start.get("column"), warn=lambda m: None)
    else:
        from .io.hkl import read_hkl
        data = read_hkl(path, warn=lambda m: None)
    st = exps[0].structure
    if st.Fhkl is None:
        _fail(spec_path, "start.hkl: the shots have no structure-factor grid to start from (give -hkl in the base)")
    at = data.indices - np.array(st.hkl_origin)
    outside = np.any((at < 0) | (at >= np.array(st.Fhkl.shape)), axis=1)
    if outside.any():
        h, k, l = data.indices[np.argmax(outside)]
        _fail(spec_path, f"start.hkl {src!r}: reflection {h} {k} {l} lies outside the shots' grid")
    grid = np.array(st.Fhkl)
    grid[tuple(at.T)] = data.amplitudes
    from .params import set_params
    return [set_params(e, {"Fhkl": grid}) for e in exps]


def _perturb(spec_path, perturb, exps, shared, space_group):
    """Starting models away from the dataset's values, seeded: misset (degrees, normal
    per axis), relative normal jitter of per-shot parameters, structure factors uniform
    within +-Fhkl of their values (one draw per refined value)."""
    from .params import set_params
    rng = np.random.default_rng(int(perturb.get("seed", 0)))
    out = []
    mis = float(perturb.get("misset", 0.0))
    rel = perturb.get("relative", {}) or {}
    if not isinstance(rel, dict):
        _fail(spec_path, f"start.perturb.relative = {rel!r}: expected {{name: fraction}}")
    for e in exps:
        values = {}
        if mis:
            d = rng.normal(0.0, mis, size=3)
            values.update({"misset_x": e.crystal.misset[0] + d[0], "misset_y": e.crystal.misset[1] + d[1],
                           "misset_z": e.crystal.misset[2] + d[2]})
        for n, f in rel.items():
            from .params import get_params
            try:
                v = get_params(e, [n])[n]
            except ParameterError as exc:
                _fail(spec_path, f"start.perturb.relative.{n}: {exc}")
            values[n] = v * (1.0 + float(f) * rng.normal())
        out.append(set_params(e, values) if values else e)
    frac = float(perturb.get("Fhkl", 0.0))
    if frac and "Fhkl" in shared:
        from .refine_many import FhklMap
        st = out[0].structure
        fmap = FhklMap(st.Fhkl, st.hkl_origin, space_group)
        cls = fmap.classes
        factor = 1.0 + frac * rng.uniform(-1.0, 1.0, size=int(cls.max()) + 1)
        grid = np.where(cls >= 0, st.Fhkl * factor[np.maximum(cls, 0)], st.Fhkl)
        out = [set_params(e, {"Fhkl": grid}) for e in out]
    return out


# ----------------------------------------------------------------------------- outputs

def _atomic(path, write):
    tmp = path + ".part"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_hkl(path, fit):
    """The refined grid points as a nanoBragg HKL file (h k l F), every refined value at
    each of its grid points."""
    from .io.hkl import write_hkl as write
    grid = fit.shared["Fhkl"]
    sd = fit.shared_uncertainties["Fhkl"]
    origin = np.array(fit.experiments[next(i for i, e in enumerate(fit.experiments) if e is not None)]
                      .structure.hkl_origin)
    at = np.argwhere(np.isfinite(sd))
    hkl = at + origin
    _atomic(path, lambda p: write(p, hkl, grid[tuple(at.T)]))


def write_mtz(path, fit, cell):
    """The refined structure factors (asymmetric unit with a space group) as MTZ: H K L,
    F and SIGF, and the number of shots that saw each (NOBS)."""
    import gemmi
    r = fit.reflections
    mtz = gemmi.Mtz(with_base=True)
    mtz.spacegroup = gemmi.SpaceGroup(fit.space_group or "P 1")
    mtz.set_cell_for_all(gemmi.UnitCell(*cell))
    mtz.add_dataset("nbragg")
    mtz.add_column("F", "F")
    mtz.add_column("SIGF", "Q")
    mtz.add_column("NOBS", "I")
    data = np.column_stack([r["h"], r["k"], r["l"], r["F"], r["sigF"], r["observations"]]).astype(np.float32)
    mtz.set_data(data)
    _atomic(path, lambda p: mtz.write_to_file(p))


def _rotation_angle(Ua, Ub):
    """Degrees between two orientations (the rotation taking one to the other; the
    orthogonal part, should the cells differ)."""
    u, _, vt = np.linalg.svd(Ua @ np.linalg.inv(Ub))
    R = u @ vt
    return float(np.degrees(np.arccos(np.clip((np.trace(R) - 1.0) / 2.0, -1.0, 1.0))))


def against_truth(fit, truth, shared, per_shot, space_group):
    """Errors of a recovery study: shared values in uncertainties, per-shot misorientation
    and relative errors, the structure factors' correlation with the truth."""
    from .engine import resolve
    out = {"shared": {}, "per_shot": {}}
    t0 = truth[0]
    from .params import get_params
    for n in shared:
        if n == "Fhkl":
            continue
        v = get_params(t0, [n])[n]
        out["shared"][n] = {"truth": v, "refined": fit.shared[n],
                            "error_in_uncertainties": (fit.shared[n] - v) / fit.shared_uncertainties[n]}
    kept = [i for i, p in enumerate(fit.per_shot) if p is not None]
    if kept:
        mis = []
        for i in kept:
            Ut = resolve(truth[i], warn=lambda m: None)[2].base_rotation
            Ur = resolve(fit.experiments[i], warn=lambda m: None)[2].base_rotation
            mis.append(_rotation_angle(Ur, Ut))
        out["per_shot"]["misorientation_deg"] = {"max": max(mis), "rms": float(np.sqrt(np.mean(np.square(mis))))}
        for n in per_shot:
            if n.startswith("misset") or n == "scale":
                continue
            rel = [abs(fit.per_shot[i][n] / get_params(truth[i], [n])[n] - 1.0) for i in kept]
            out["per_shot"][n] = {"max_relative_error": max(rel), "rms_relative_error":
                                  float(np.sqrt(np.mean(np.square(rel))))}
    if "Fhkl" in shared:
        r = fit.reflections
        grid = truth[0].structure.Fhkl
        origin = np.array(truth[0].structure.hkl_origin)
        hkl = np.stack([r["h"], r["k"], r["l"]], axis=1) - origin
        Ft = grid[tuple(hkl.T)]
        seen3 = r["observations"] >= 3
        out["Fhkl"] = {"refined": int(len(Ft)), "seen_3_times": int(seen3.sum()),
                       "correlation_seen_3_times": float(np.corrcoef(r["F"][seen3], Ft[seen3])[0, 1])
                       if seen3.sum() > 2 else None,
                       "correlation_all": float(np.corrcoef(r["F"], Ft)[0, 1]) if len(Ft) > 2 else None}
    return out


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, (np.floating, float)):
        return float(v) if np.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


def report(fit, truth_errors=None):
    shared = {n: v for n, v in fit.shared.items() if n != "Fhkl"}
    return _jsonable({
        "success": fit.success, "message": fit.message, "method": fit.method, "loss": fit.loss,
        "final_loss": fit.final_loss, "history": fit.history, "iterations": fit.iterations,
        "evaluations": fit.evaluations, "wall_time_s": fit.wall_time, "resumed": fit.resumed,
        "shared": shared, "shared_uncertainties": {n: fit.shared_uncertainties[n] for n in shared},
        "structure_factors": None if fit.reflections is None else
        {"refined": len(fit.reflections["F"]), "space_group": fit.space_group},
        "per_shot": fit.per_shot, "per_shot_uncertainties": fit.per_shot_uncertainties,
        "dropped": {str(k): v for k, v in fit.dropped.items()},
        "against_truth": truth_errors,
    })


# ----------------------------------------------------------------------------- main

def main(argv=None):
    return console_main("nbragg-refine-many", _main, argv)


def _main(argv):
    ap = argparse.ArgumentParser(prog="nbragg-refine-many", description=__doc__.split("\n\n")[0])
    ap.add_argument("spec")
    ap.add_argument("--dataset", help="the nbragg-dataset file (instead of the spec's shots.dataset)")
    ap.add_argument("--output", help="output stem (instead of the spec's output)")
    ap.add_argument("--workers", type=int, help="Dask workers (0: this process)")
    ap.add_argument("--checkpoint", help="checkpoint directory")
    ap.add_argument("--max-iterations", type=int)
    ap.add_argument("-noprogress", "--no-progress", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true", help="log every iteration's loss and damping")
    try:
        a = ap.parse_args(argv)
    except SystemExit as exc:
        if exc.code:
            raise ArgumentError("bad arguments (see nbragg-refine-many --help)") from None
        raise
    if a.verbose:
        import logging
        logging.basicConfig(format="%(message)s")
        logging.getLogger("nbragg.refine_many").setLevel(logging.INFO)
    spec = load_spec(a.spec)
    base_dir = os.path.dirname(os.path.abspath(a.spec))
    shots = spec["shots"]
    masks = None
    if isinstance(shots, dict):
        exps, obs = _dataset_shots(a.spec, shots, base_dir, a.dataset)
    elif isinstance(shots, list):
        exps, obs, masks = _image_shots(a.spec, shots, base_dir)
    else:
        _fail(a.spec, f"shots = {shots!r}: expected {{dataset: FILE}} or a list of {{image, args}}")
    shared, per_shot = list(spec.get("shared", [])), list(spec.get("per_shot", []))
    space_group = spec.get("space_group")
    start = spec.get("start", {}) or {}
    if not isinstance(start, dict):
        _fail(a.spec, f"start = {start!r}: expected a mapping")
    truth = None
    perturb = start.get("perturb")
    if perturb is not None:
        if not isinstance(perturb, dict):
            _fail(a.spec, f"start.perturb = {perturb!r}: expected a mapping")
        truth = exps
        exps = _perturb(a.spec, perturb, exps, shared, space_group)
    exps = _start_grid(a.spec, start, exps, base_dir)
    if start.get("set"):
        from .params import set_params
        try:
            exps = [set_params(e, dict(start["set"])) for e in exps]
        except NbraggError as exc:
            _fail(a.spec, f"start.set: {exc}")
    restraints = {n: tuple(v) if isinstance(v, list) else v for n, v in (spec.get("restraints") or {}).items()}
    bounds = {n: tuple(v) for n, v in (spec.get("bounds") or {}).items()}
    options = {k: spec[k] for k in ("max_iterations", "ftol", "atol", "gtol", "damping") if k in spec}
    if a.max_iterations is not None:
        options["max_iterations"] = a.max_iterations
    checkpoint = a.checkpoint or (os.path.join(base_dir, spec["checkpoint"]) if spec.get("checkpoint") else None)
    workers = a.workers if a.workers is not None else spec.get("workers")
    from .refine_many import refine_many
    fit = refine_many(exps, obs, shared=shared, per_shot=per_shot, loss=spec.get("loss", "poisson"),
                      method=spec.get("method", "gauss_newton"), masks=masks, bounds=bounds, restraints=restraints,
                      space_group=space_group, min_observations=spec.get("min_observations", 1),
                      min_photons=spec.get("min_photons", 1.0), stages=spec.get("stages"), workers=workers,
                      scheduler=spec.get("scheduler"),
                      threads_per_worker=spec.get("threads_per_worker", 1), checkpoint=checkpoint,
                      progress=not a.no_progress and spec.get("progress", True), **options)
    stem = a.output or spec.get("output", "refined")
    if not a.output:
        stem = os.path.join(base_dir, stem) if not os.path.isabs(stem) else stem
    truth_errors = against_truth(fit, truth, shared, per_shot, space_group) if truth is not None else None
    written = []
    if "Fhkl" in shared:
        write_hkl(stem + ".hkl", fit)
        written.append(stem + ".hkl")
        try:
            import gemmi  # noqa: F401
        except ImportError:
            print("nbragg-refine-many: gemmi is not installed: no MTZ written (pip install gemmi)", file=sys.stderr)
        else:
            ref = next(e for e in fit.experiments if e is not None)
            write_mtz(stem + ".mtz", fit, ref.crystal.cell)
            written.append(stem + ".mtz")
    rep = report(fit, truth_errors)
    _atomic(stem + ".json", lambda p: open(p, "w").write(json.dumps(rep, indent=1)))
    written.append(stem + ".json")
    print(fit.table())
    if truth_errors is not None:
        print(json.dumps(_jsonable(truth_errors), indent=1))
    print("wrote " + ", ".join(written))
    return 0 if fit.success else 1


if __name__ == "__main__":
    sys.exit(main())
