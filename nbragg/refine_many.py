"""Many-shot refinement: parameters shared by every shot (structure factors, detector,
cell, beam) refined jointly with each shot's own (orientation, domain size, scale...).

``refine_many(experiments, observed, shared=[...], per_shot=[...])`` minimises the sum of
the shots' losses (Poisson deviance or l2, as :func:`nbragg.refine`) plus optional
restraints.  Every shot is evaluated by the same engine as one image (forward, adjoint,
tangent kernels); the shots run as Dask tasks (or in this process with ``workers=0``),
each holding one shot's image, and the partial results are reduced in shot order on the
caller's side, so the answer does not depend on the number of workers.

Methods:

* ``"gauss_newton"`` (default): Levenberg-Marquardt on the Gauss-Newton (Fisher)
  normal matrix.  The per-shot blocks are eliminated against the shared ones (the Schur
  complement), so only the shared parameters' reduced matrix is ever formed and no
  Jacobian of all shots: each shot sends its own blocks (scalar parameters from the
  tangent kernel, structure factors from the labelling walk, which splits every pixel's
  photons among its reflections).  The gradient is exact (adjoint kernel).
* ``"lbfgs"``: scipy's L-BFGS-B on the summed gradient (one adjoint pass per shot per
  evaluation), in parameters scaled by the Gauss-Newton curvature at the start.

Structure factors (``"Fhkl"`` among the shared names) are refined on the experiments'
grid: every grid point its own value (``space_group=None``), or one value per
reflection of the asymmetric unit of ``space_group`` (gemmi; symmetry mates and Friedel
mates share it, systematic absences stay as they are).  Only reflections seen in at
least ``min_observations`` shots (with at least ``min_photons`` expected photons in the
fitted pixels at the start) are refined; the others keep their values.  ``"scale"`` is
a per-shot factor on the image (start 1).

Shots that cannot be used -- the model puts no photons in the fitted pixels, the
experiment fails, an evaluation gives a non-finite loss -- are dropped with the reason
(``ManyFit.dropped``) and the run goes on without them.

``checkpoint=DIR`` keeps the state after every iteration (Gauss-Newton) or every
evaluation (L-BFGS, whose run is replayed from the log); a run restarted with the same
problem and directory resumes and ends where the uninterrupted run would have.
"""

from __future__ import annotations

import hashlib
import json
import math
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from .errors import NbraggError, ParameterError
from .params import check_names, get_params, set_params

_log = logging.getLogger("nbragg.refine_many")

LOSSES = ("poisson", "l2")
METHODS = ("gauss_newton", "lbfgs")
SHOT_ONLY = ("scale",)          # parameters refine_many adds: a factor on the shot's image


class ManyFitError(NbraggError):
    """A many-shot refinement that cannot start or go on."""


@dataclass
class ManyFit:
    """The result of :func:`refine_many`.

    shared : name -> refined value (``Fhkl``: the whole grid)
    per_shot : one dict name -> value per shot (None for a dropped shot)
    shared_uncertainties, per_shot_uncertainties : standard uncertainties, same layout
        (``Fhkl``: a grid, NaN where not refined)
    reflections : the refined structure factors as a table (dict of arrays: h k l F sigF
        observations), one row per refined value (the asymmetric-unit index with a space
        group)
    dropped : shot index -> reason
    experiments : the refined Experiment of each shot (None when dropped)
    history : the total loss after each iteration (Gauss-Newton) or evaluation (L-BFGS)
    resumed : how many iterations (Gauss-Newton) or evaluations (L-BFGS) came from the
        checkpoint
    """

    shared: Dict[str, object]
    per_shot: List[Optional[Dict[str, float]]]
    shared_uncertainties: Dict[str, object]
    per_shot_uncertainties: List[Optional[Dict[str, float]]]
    history: List[float]
    success: bool
    message: str
    dropped: Dict[int, str]
    experiments: List[object]
    reflections: Optional[dict] = None
    iterations: int = 0
    evaluations: int = 0
    wall_time: float = 0.0
    final_loss: float = float("nan")
    method: str = ""
    loss: str = ""
    space_group: Optional[str] = None
    start_shared: Dict[str, object] = field(default_factory=dict)
    resumed: int = 0        # iterations (Gauss-Newton) or evaluations (L-BFGS) taken from a checkpoint

    def table(self):
        lines = ["%-16s %16s %16s %14s" % ("shared", "start", "refined", "uncertainty")]
        for n, v in self.shared.items():
            if n == "Fhkl":
                r = self.reflections
                lines.append(f"{'Fhkl':16s} {len(r['F'])} structure factors refined")
                continue
            lines.append("%-16s %16.8g %16.8g %14.4g" % (n, self.start_shared.get(n, float("nan")), v,
                                                         self.shared_uncertainties.get(n, float("nan"))))
        kept = sum(p is not None for p in self.per_shot)
        lines.append(f"{kept} shots refined, {len(self.dropped)} dropped; {self.method}, {self.loss} loss "
                     f"{self.final_loss:.8g}: {self.message} ({self.iterations} iterations, "
                     f"{self.evaluations} evaluations, {self.wall_time:.1f} s)")
        return "\n".join(lines)

    def __str__(self):
        return self.table()


# ----------------------------------------------------------------------------- structure factors

class FhklMap:
    """Which grid points of the structure-factor grid share a refined value.

    ``index`` (grid shape) holds the parameter index of every grid point, -1 for points
    held fixed; ``hkl`` (n, 3) names each parameter (a grid point, or the reflection of
    the asymmetric unit)."""

    def __init__(self, grid, origin, space_group=None):
        grid = np.asarray(grid, dtype=np.float64)
        self.shape = grid.shape
        self.origin = tuple(int(o) for o in origin)
        self.space_group = None
        idx = np.indices(self.shape).reshape(3, -1).T + np.array(self.origin)
        if space_group is None:
            keys = np.arange(grid.size)
            self.classes = keys.reshape(self.shape)
            self.class_hkl = idx
        else:
            try:
                import gemmi
            except ImportError:
                raise ParameterError("space_group needs gemmi: pip install \"nbragg[crystallography]\"") from None
            try:
                sg = gemmi.SpaceGroup(space_group) if isinstance(space_group, str) else \
                    gemmi.find_spacegroup_by_number(int(space_group))
            except (ValueError, RuntimeError, TypeError):
                sg = None
            if sg is None:
                raise ParameterError(f"space_group = {space_group!r} is not a space group gemmi knows")
            self.space_group = sg.hm
            ops = sg.operations()
            asu = gemmi.ReciprocalAsu(sg)
            seen = {}
            cls = np.full(grid.size, -1, dtype=np.int64)
            hkls = []
            for i, hkl in enumerate(idx.tolist()):
                if hkl == [0, 0, 0] or ops.is_systematically_absent(hkl):
                    continue
                key = tuple(asu.to_asu(hkl, ops)[0])
                c = seen.get(key)
                if c is None:
                    c = seen[key] = len(hkls)
                    hkls.append(key)
                cls[i] = c
            self.classes = cls.reshape(self.shape)
            self.class_hkl = np.array(hkls, dtype=np.int64).reshape(-1, 3)
        self.index = np.full(self.shape, -1, dtype=np.int64)
        self.hkl = np.zeros((0, 3), dtype=np.int64)

    def select(self, refined_classes):
        """Refine these classes (sorted): parameter j is class refined_classes[j]."""
        refined_classes = np.asarray(refined_classes, dtype=np.int64)
        lookup = np.full(max(int(self.classes.max()) + 1, 1), -1, dtype=np.int64)
        lookup[refined_classes] = np.arange(len(refined_classes))
        c = self.classes
        self.index = np.where(c >= 0, lookup[np.maximum(c, 0)], -1)
        self.hkl = self.class_hkl[refined_classes]

    @property
    def size(self):
        return len(self.hkl)

    def values(self, grid):
        """The parameters' values from a grid: the mean over each parameter's grid points."""
        sel = self.index >= 0
        s = np.bincount(self.index[sel], weights=np.asarray(grid)[sel], minlength=self.size)
        n = np.bincount(self.index[sel], minlength=self.size)
        return s / np.maximum(n, 1)

    def expand(self, params, grid0):
        grid = np.array(grid0, dtype=np.float64)
        sel = self.index >= 0
        grid[sel] = np.asarray(params)[self.index[sel]]
        return grid

    def reduce(self, grid_gradient):
        sel = self.index >= 0
        return np.bincount(self.index[sel], weights=np.asarray(grid_gradient)[sel], minlength=self.size)


# ----------------------------------------------------------------------------- one shot (worker side)

@dataclass
class FrameRef:
    """Frame ``index`` of an HDF5 dataset (an ``nbragg-dataset`` master), read when used."""

    path: str
    index: int
    dataset: str = "data"

    def load(self):
        from .dataset.layout import read_frame
        return np.asarray(read_frame(self.path, self.index, self.dataset), dtype=np.float64)


@dataclass
class _Shot:
    index: int
    experiment: object
    observed: object           # array, or FrameRef
    mask: object
    loss: str
    shared: tuple              # shared scalar names
    own: tuple                 # per-shot names (may hold "scale")
    threads: int


def _shot_arrays(shot, exp):
    from .refine import _selection
    obs = shot.observed.load() if isinstance(shot.observed, FrameRef) else shot.observed
    return _selection(exp, obs, shot.mask)


def _objective(shot, obs):
    from .refine import _Objective
    return _Objective(shot.loss, obs)


def _weights(loss, m):
    return 1.0 / np.maximum(m, 1e-300) if loss == "poisson" else np.ones_like(m)


def shot_experiment(shot, shared_values, grid, own_values, fold_scale=False):
    """The shot's Experiment at these values; with ``fold_scale`` the per-shot scale goes
    into the fluence (the image is linear in it), so the Experiment makes the fitted image."""
    values = dict(shared_values)
    values.update({n: v for n, v in own_values.items() if n not in SHOT_ONLY})
    exp = set_params(shot.experiment, values) if values else shot.experiment
    if grid is not None:
        exp = set_params(exp, {"Fhkl": grid})
    if fold_scale and own_values.get("scale", 1.0) != 1.0:
        exp = exp.replace(beam=exp.beam.replace(fluence=exp.beam.fluence * own_values["scale"]))
    return exp


def evaluate_shot(shot, shared_state, own_state, mode):
    """One shot at the given parameters.  ``mode``: "value" (the loss), "gradient" (and
    its gradient), "normal" (and the Gauss-Newton blocks), "survey" (the photons of each
    refinable structure-factor class at the start).  Returns a dict, or {"error": text}
    when the shot cannot be evaluated."""
    try:
        return _evaluate_shot(shot, shared_state, own_state, mode)
    except (NbraggError, np.linalg.LinAlgError, FloatingPointError, ValueError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def _evaluate_shot(shot, shared_state, own_state, mode):
    from .engine import build_model, render, tangent_image
    from .gradients import raw_gradient
    from .params import input_tangent
    shared_values, grid, fhkl_index = shared_state
    own_values, keep = own_state
    exp = shot_experiment(shot, shared_values, grid, own_values)
    obs_full, sel = _shot_arrays(shot, exp)
    if keep is not None:
        sel[sel] = keep
    model = build_model(exp, warn=lambda m: None)
    scale = float(own_values.get("scale", 1.0))
    scalar = [n for n in shot.shared + shot.own if n not in SHOT_ONLY]
    if mode == "survey":
        out = _survey(shot, model, sel, scale, fhkl_index)
        if shot.loss == "poisson":
            # pixels the model leaves dark (cut by -dmin, out of the grid's reach) carry no
            # information for Poisson: left out from the start
            out["keep"] = render(model, threads=shot.threads)[0].reshape(model.shape)[sel] > 0
        return out
    if mode == "normal" and scalar:
        d = np.array([input_tangent(model, n) for n in scalar]).reshape(len(scalar), -1)
        J, image = tangent_image(model, d, threads=shot.threads)
        J = J.reshape(model.shape + (len(scalar),))
    else:
        image = render(model, threads=shot.threads)[0]
        J = None
    image = image.reshape(model.shape)
    obj = _objective(shot, obs_full[sel])
    m = scale * image[sel]
    r = obj.residuals(m)
    value = float(np.sum(r * r))      # (numpy's own sums, not a BLAS that threads differently per process)
    if not math.isfinite(value):
        return {"error": f"the loss is not finite ({value})"}
    out = {"value": value, "pixels": int(sel.sum())}
    if mode == "value":
        return out
    u = np.zeros(model.shape)
    u[sel] = obj.dvalue_dm(m)
    has_F = fhkl_index is not None
    g = {}
    if "scale" in shot.own:
        g["scale"] = float(np.sum(u[sel] * image[sel]))
    if J is not None:
        Js = scale * J[sel]                      # dm/dtheta over the fitted pixels
        gs = np.einsum("p,pk->k", u[sel], Js)
        g.update({n: float(v) for n, v in zip(scalar, gs)})
    JF = None
    if mode == "normal" and has_F:
        # dm/dF from the labelling walk; when every pixel's photons fit its slots (no
        # "other" share) it is exact and gives the structure factors' gradient too
        JF, touched, complete = _fhkl_jacobian(shot, model, sel, scale, exp.structure.Fhkl, fhkl_index)
        # with tricubic interpolation (-interpolate, or N <= 2) a sample's F comes from the
        # neighbouring grid points too: the labels' dm/dF is then the normal matrix's
        # approximation only, and the gradient comes from the adjoint
        if complete and not model.scene.fhkl.interpolate:
            out["F_index"] = touched
            out["F_gradient"] = np.asarray(JF.T @ u[sel])
    if (mode == "gradient" and scalar) or (has_F and "F_index" not in out):
        raw = raw_gradient(model, scale * u, threads=shot.threads, want_F=has_F)
        if J is None:
            g.update({n: float(np.sum(raw.flat * input_tangent(model, n))) for n in scalar})
        if has_F:
            sel_F = fhkl_index >= 0
            gF = raw.Fgrid[sel_F]
            pF = fhkl_index[sel_F]
            touched_adj = np.unique(pF[gF != 0.0])
            full = np.bincount(pF, weights=gF, minlength=int(fhkl_index.max()) + 1)
            out["F_index"] = touched_adj
            out["F_gradient"] = full[touched_adj]
    names = list(shot.shared) + list(shot.own)
    out["gradient"] = np.array([g[n] for n in names])
    if mode == "gradient":
        return out
    # Gauss-Newton blocks: H = 2 Jm^T W Jm (Fisher information of the deviance; l2: W = 1)
    cols = []
    for n in names:
        cols.append(image[sel] if n == "scale" else Js[:, scalar.index(n)])
    Jq = np.stack(cols, axis=1) if cols else np.zeros((int(sel.sum()), 0))
    W = _weights(shot.loss, m)
    out["H_qq"] = 2.0 * np.einsum("pi,pj->ij", Jq, W[:, None] * Jq)
    if has_F:
        # the adjoint's set may hold reflections whose photons all went to "other"
        union = np.union1d(touched, out["F_index"])
        if len(union) != len(touched):
            JF = _widen(JF, touched, union)
        gF = np.zeros(len(union))
        gF[np.searchsorted(union, out["F_index"])] = out["F_gradient"]
        out["F_index"], out["F_gradient"] = union, gF
        WJF = JF.multiply(W[:, None]).tocsc()
        out["H_FF"] = 2.0 * (JF.T @ WJF).toarray()
        out["H_Fq"] = 2.0 * np.asarray(WJF.T @ Jq)
    return out


def _widen(JF, touched, union):
    import scipy.sparse as sp
    cols = np.searchsorted(union, touched)
    P = sp.csr_matrix((np.ones(len(touched)), (np.arange(len(touched)), cols)), shape=(len(touched), len(union)))
    return (JF @ P).tocsr()


def _fhkl_jacobian(shot, model, sel, scale, grid, fhkl_index):
    """(dm/dF, touched, complete): dm/dF over the fitted pixels as a sparse (pixels, k)
    matrix for the k refined parameters the shot touches (sorted), and whether every
    pixel's photons fitted its slots.  Every sample's term is F(h)^2 times the rest, so a
    pixel's share of reflection h contributes 2 share / F(h)."""
    import scipy.sparse as sp
    from .labels import label_shares
    hkl, share, other = label_shares(model, threads=shot.threads)
    complete = not np.any(other.reshape(model.shape)[sel])
    hkl = hkl.reshape(model.shape + hkl.shape[-2:])[sel]          # (pixels, SLOTS, 3)
    share = share.reshape(model.shape + share.shape[-1:])[sel]    # (pixels, SLOTS)
    g = hkl - np.array(model.experiment.structure.hkl_origin)
    shape = np.array(grid.shape)
    inside = np.all((g >= 0) & (g < shape), axis=-1) & (share > 0)
    flat = np.ravel_multi_index(tuple(np.where(inside[..., None], g, 0).transpose(2, 0, 1)), grid.shape)
    param = np.where(inside, fhkl_index.ravel()[flat], -1)
    F = np.asarray(grid).ravel()[flat]
    use = (param >= 0) & (F != 0)
    rows = np.nonzero(use)[0]
    vals = 2.0 * scale * share[use] / F[use]
    touched, cols = np.unique(param[use], return_inverse=True)
    JF = sp.csr_matrix((vals, (rows, cols.ravel())), shape=(share.shape[0], len(touched)))
    JF.sum_duplicates()
    return JF, touched, complete


def _survey(shot, model, sel, scale, fhkl_index):
    """The photons of every structure-factor class in the fitted pixels, and the total
    Bragg photons there (a shot with none has no spots to fit)."""
    from .labels import label_shares
    hkl, share, other = label_shares(model, threads=shot.threads)
    hkl = hkl.reshape(model.shape + hkl.shape[-2:])[sel]
    share = scale * share.reshape(model.shape + share.shape[-1:])[sel]
    total = float(share.sum() + scale * other.reshape(model.shape)[sel].sum())
    out = {"photons": total}
    if fhkl_index is not None:
        grid = model.experiment.structure.Fhkl
        g = hkl - np.array(model.experiment.structure.hkl_origin)
        inside = np.all((g >= 0) & (g < np.array(grid.shape)), axis=-1) & (share > 0)
        flat = np.ravel_multi_index(tuple(g[inside].T), grid.shape)
        cls = fhkl_index.ravel()[flat]
        keep = cls >= 0
        classes, inv = np.unique(cls[keep], return_inverse=True)
        out["classes"] = classes
        out["class_photons"] = np.bincount(inv.ravel(), weights=share[inside][keep], minlength=len(classes))
    return out


# ----------------------------------------------------------------------------- execution

class _Serial:
    def __init__(self, shots):
        self.load(shots)

    def load(self, shots):
        self.shots = {s.index: s for s in shots}

    def run(self, mode, shared_state, own, active, bar=None):
        out = {}
        for i in active:
            out[i] = evaluate_shot(self.shots[i], shared_state, own[i], mode)
            if bar is not None:
                bar.update(1)
        return out

    def close(self):
        pass


def evaluate_shots(shots, shared_state, own_states, mode):
    """Several shots in one task (fewer scheduler round trips): a list of results."""
    return [evaluate_shot(s, shared_state, o, mode) for s, o in zip(shots, own_states)]


class _Dask:
    """Shots as Dask tasks: each shot sent once to a worker that keeps it, the shared
    values broadcast per call, a task per several shots of one worker; results collected by
    shot index (the caller reduces them in shot order)."""

    CHUNK = 8               # shots per task at least; and about this many tasks per worker per pass:
    TASKS_PER_WORKER = 4    # fewer round trips through the scheduler, still some balance

    def __init__(self, shots, workers, scheduler):
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            raise ManyFitError("workers/scheduler need dask.distributed (pip install \"nbragg[dataset]\"); "
                               "workers=0 runs in this process without it") from None
        self.cluster = None
        if scheduler is None:
            self.cluster = LocalCluster(n_workers=int(workers), threads_per_worker=1, processes=True,
                                        dashboard_address=":0")       # any free port
            self.client = Client(self.cluster)
        else:
            self.client = Client(scheduler)
        self.load(shots)

    def load(self, shots):
        """Send the shots (their experiments and images) to the workers, once per stage,
        each to one worker that keeps it."""
        workers = sorted(self.client.scheduler_info()["workers"])
        if not workers:
            raise ManyFitError("the Dask cluster has no workers")
        groups = {w: [s for k, s in enumerate(shots) if k % len(workers) == j] for j, w in enumerate(workers)}
        self.home, self.shots = {}, {}
        for w, mine in groups.items():
            if mine:
                futures = self.client.scatter(mine, workers=[w], hash=False)
                for s, f in zip(mine, futures):
                    self.shots[s.index] = f
                    self.home[s.index] = w

    def run(self, mode, shared_state, own, active, bar=None):
        from distributed import as_completed
        state = self.client.scatter(shared_state, broadcast=True, hash=False)
        tasks = {}
        for w in sorted(set(self.home[i] for i in active)):
            mine = [i for i in active if self.home[i] == w]
            size = max(self.CHUNK, -(-len(mine) // self.TASKS_PER_WORKER))
            for c in range(0, len(mine), size):
                chunk = mine[c:c + size]
                fut = self.client.submit(evaluate_shots, [self.shots[i] for i in chunk], state,
                                         [own[i] for i in chunk], mode, workers=[w], pure=False)
                tasks[fut] = chunk
        out = {}
        for fut in as_completed(list(tasks)):
            for i, r in zip(tasks[fut], fut.result()):
                out[i] = r
            if bar is not None:
                bar.update(len(tasks[fut]))
        return out

    def close(self):
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


# ----------------------------------------------------------------------------- the problem

class _Problem:
    """Parameter vector x = [shared scalars, structure factors, shot 0's, shot 1's, ...]
    in user units; the loss, gradient and normal blocks summed in shot order."""

    def __init__(self, shots, shared_names, own_names, fmap, grid0, x0, lo, hi, restraints, executor, progress):
        self.shots = shots
        self.shared_names = shared_names
        self.own_names = own_names
        self.fmap = fmap
        self.grid0 = grid0
        self.ns = len(shared_names)
        self.nF = fmap.size if fmap is not None else 0
        self.np = len(own_names)
        self.n_shared = self.ns + self.nF
        self.x0 = x0
        self.lo, self.hi = lo, hi
        self.restraints = restraints      # [(slice or index array into x, target, sigma)]
        self.loss = shots[0].loss
        self.executor = executor
        self.progress = progress
        self.active = [s.index for s in shots]
        self.dropped = {}
        self.evaluations = 0
        self.resumed = 0
        self.keep = {}             # shot -> the fitted pixels the model lights at the start

    def own_slice(self, i):
        a = self.n_shared + i * self.np
        return slice(a, a + self.np)

    def state(self, x):
        shared = {n: float(v) for n, v in zip(self.shared_names, x[:self.ns])}
        if self.fmap is None:
            return (shared, None, None), self.own_values(x)
        grid = self.fmap.expand(x[self.ns:self.n_shared], self.grid0)
        return (shared, grid, self.fmap.index), self.own_values(x)

    def own_values(self, x):
        return {i: ({n: float(v) for n, v in zip(self.own_names, x[self.own_slice(i)])}, self.keep.get(i))
                for i in self.active}

    def run(self, x, mode, label, drop=True, shots=None):
        """Evaluate the active shots (or ``shots``) at x: ({shot: result}, whether any
        failed).  Failed shots are dropped (with ``drop``; a trial step's failure only
        rejects the step)."""
        shared_state, own = self.state(x)
        which = list(self.active) if shots is None else list(shots)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(which), desc=label, unit="shot", leave=False)
        try:
            res = self.executor.run(mode, shared_state, own, which, bar)
        finally:
            if bar is not None:
                bar.close()
        self.evaluations += 1
        failed = [i for i in which if "error" in res[i]]
        if not drop:
            return res, bool(failed)
        for i in failed:
            self.dropped[i] = f"evaluation failed: {res[i]['error']}"
        if failed:
            self.active = [i for i in self.active if i not in failed]
        return res, bool(failed)

    def drop_diverged(self, x):
        """Drop the shots whose own parameters reached a bound (not a physical limit such
        as one unit cell): they have wandered off (a misset 2 degrees from its start...)."""
        from .refine import _at_bounds
        if not self.np:
            return
        for i in list(self.active):
            own = self.own_slice(i)
            hit = _at_bounds(self.own_names, x[own], self.lo[own], self.hi[own])
            if hit:
                n, side = next(iter(hit.items()))
                v = x[own][self.own_names.index(n)]
                self.dropped[i] = f"diverged: {n} reached its {side} bound ({v:g})"
                self.active.remove(i)
        if not self.active:
            raise ManyFitError("every shot diverged: " + "; ".join(f"shot {i}: {r}"
                                                                    for i, r in sorted(self.dropped.items())))

    def restraint_value(self, x):
        v = 0.0
        for at, target, sigma in self.restraints:
            d = (x[at] - target) / sigma
            v += float(np.dot(d, d))
        return v

    def restraint_gradient(self, x, g):
        for at, target, sigma in self.restraints:
            g[at] += 2.0 * (x[at] - target) / sigma ** 2

    def restraint_diag(self, diag):
        for at, target, sigma in self.restraints:
            diag[at] += 2.0 / np.broadcast_to(sigma, np.shape(diag[at])) ** 2

    def value(self, x, res):
        return float(sum(res[i]["value"] for i in self.active)) + self.restraint_value(x)

    def gradient(self, x, res):
        g = np.zeros(len(x))
        for i in self.active:            # shot order: the same sum for any number of workers
            r = res[i]
            g[:self.ns] += r["gradient"][:self.ns]
            g[self.own_slice(i)] = r["gradient"][self.ns:]
            if self.nF:
                g[self.ns + r["F_index"]] += r["F_gradient"]
        self.restraint_gradient(x, g)
        return g


# ----------------------------------------------------------------------------- Gauss-Newton (Schur)

def _shot_blocks(prob, r):
    """(T, A, B, C, g_s, g_p) for one shot: T the shared indices it touches, A the
    shared-shared block on T, B shared-own, C own-own, and the gradient's parts."""
    ns, nq = prob.ns, prob.ns + prob.np
    H = r["H_qq"]
    g = r["gradient"]
    if prob.nF:
        F = r["F_index"]
        T = np.concatenate([np.arange(ns), ns + F])
        HFq = r["H_Fq"]
        A = np.block([[H[:ns, :ns], HFq[:, :ns].T], [HFq[:, :ns], r["H_FF"]]])
        B = np.vstack([H[:ns, ns:nq], HFq[:, ns:nq]])
        gs = np.concatenate([g[:ns], r["F_gradient"]])
    else:
        T = np.arange(ns)
        A, B, gs = H[:ns, :ns], H[:ns, ns:nq], g[:ns]
    return T, A, B, H[ns:nq, ns:nq], gs, g[ns:nq]


def normal_equations(prob, x, res):
    """The summed pieces of the Gauss-Newton system in shot order: (S0, gs, per-shot
    blocks), S0 the shared-shared matrix before elimination (restraints included)."""
    n = prob.n_shared
    S0 = np.zeros((n, n))
    diag = np.zeros(len(x))
    prob.restraint_diag(diag)
    g = prob.gradient(x, res)            # exact (adjoint), restraints included
    blocks = {}
    for i in prob.active:
        T, A, B, C, _, _ = _shot_blocks(prob, res[i])
        S0[np.ix_(T, T)] += A
        own = prob.own_slice(i)
        blocks[i] = (T, B, C + np.diag(diag[own]), g[own])
    S0[np.diag_indices(n)] += diag[:n]
    return S0, g[:n], blocks, g


def schur_step(prob, S0, gs, blocks, lam):
    """The damped Gauss-Newton step (H + diag(lam) diag(H)) dx = -g with the per-shot
    blocks eliminated: (A - sum B C^-1 B^T) dx_s = -(g_s - sum B C^-1 g_p), then each
    shot's dx_p = -C^-1 (g_p + B^T dx_s).  ``lam``: one Marquardt factor per parameter
    (or one for all)."""
    n = prob.n_shared
    lam = np.broadcast_to(np.asarray(lam, dtype=np.float64), (n + prob.np * len(prob.shots),))
    S = S0.copy()
    S[np.diag_indices(n)] += lam[:n] * _damping(np.diag(S0))
    b = gs.copy()
    solved = {}
    for i in prob.active:
        T, B, C, g_p = blocks[i]
        Cd = C + np.diag(lam[prob.own_slice(i)] * _damping(np.diag(C)))
        CiBt = _solve_spd(Cd, np.column_stack([B.T, g_p]))
        S[np.ix_(T, T)] -= B @ CiBt[:, :-1]
        b[T] -= B @ CiBt[:, -1]
        solved[i] = (T, B, Cd)
    dx = np.zeros(n + prob.np * len(prob.shots))
    if n:
        dx[:n] = -_solve_spd(S, b)
    for i in prob.active:
        T, B, Cd = solved[i]
        g_p = blocks[i][3]
        dx[prob.own_slice(i)] = -_solve_spd(Cd, g_p + B.T @ dx[T])
    return dx


def own_step(prob, blocks, i, dx, lam):
    """Shot i's step for the shared step in dx and its own damping: -C^-1 (g_p + B^T dx_s)."""
    T, B, C, g_p = blocks[i]
    Cd = C + np.diag(lam[prob.own_slice(i)] * _damping(np.diag(C)))
    return -_solve_spd(Cd, g_p + B.T @ dx[T])


def dense_step(prob, S0, gs, blocks, lam):
    """The same step from the whole normal matrix (for checking the elimination)."""
    N = prob.n_shared + prob.np * len(prob.shots)
    H = np.zeros((N, N))
    g = np.zeros(N)
    n = prob.n_shared
    H[:n, :n] = S0
    g[:n] = gs
    for i in prob.active:
        T, B, C, g_p = blocks[i]
        o = np.arange(N)[prob.own_slice(i)]
        H[np.ix_(T, o)] = B
        H[np.ix_(o, T)] = B.T
        H[np.ix_(o, o)] = C
        g[o] = g_p
    lam = np.broadcast_to(np.asarray(lam, dtype=np.float64), (N,))
    used = np.nonzero(np.any(H != 0, axis=1) | (g != 0))[0]
    Hu = H[np.ix_(used, used)]
    Hu[np.diag_indices(len(used))] += lam[used] * _damping(np.diag(Hu))
    dx = np.zeros(N)
    dx[used] = -np.linalg.solve(Hu, g[used])
    return dx


def _damping(d):
    return np.maximum(d, 1e-12 * max(float(np.max(d, initial=0.0)), 1e-300))


def _solve_spd(A, b):
    try:
        from scipy.linalg import cho_factor, cho_solve
        return cho_solve(cho_factor(A), b)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(A, b, rcond=None)[0]


def _covariance_diag(prob, S0, blocks, loss):
    """Diagonals of the covariance (J^T W J)^-1 = 2 H^-1 (Poisson), shared and per shot;
    l2: sigma^2 (J^T J)^-1 = 2 sigma^2 H^-1 with sigma^2 the residual variance."""
    n = prob.n_shared
    S = S0.copy()
    Cinv = {}
    for i in prob.active:
        T, B, C, _ = blocks[i]
        Ci = np.linalg.pinv(C)
        Cinv[i] = Ci
        S[np.ix_(T, T)] -= B @ Ci @ B.T
    Sinv = np.linalg.pinv(S) if n else np.zeros((0, 0))
    shared = 2.0 * np.diag(Sinv)
    own = {}
    for i in prob.active:
        T, B, C, _ = blocks[i]
        Ci = Cinv[i]
        K = Ci @ B.T                                    # (p, |T|)
        own[i] = 2.0 * (np.diag(Ci) + np.einsum("ij,jk,ik->i", K, Sinv[np.ix_(T, T)], K))
    return shared, own


def _gauss_newton(prob, x, options, ckpt):
    """Levenberg-Marquardt with a damping factor for the shared parameters and one per
    shot: a step is taken when the total loss falls; a shot whose own loss rose under it
    keeps its own values this time and damps its own parameters more next time, so one
    stubborn shot does not hold back the rest (and no round waits on a few shots)."""
    max_iter = int(options.get("max_iterations", 50))
    ftol = float(options.get("ftol", 1e-10))
    xtol = float(options.get("xtol", 1e-10))
    # a Poisson deviance that moves by less than 0.01 per shot is statistically still (one
    # standard uncertainty of a parameter is worth 1); a structure factor heading for 0
    # moves by halves under Gauss-Newton (m ~ F^2), and the nearest-index lookup's steps
    # stall the last digits
    atol = float(options.get("atol", 0.01 * len(prob.active) if prob.loss == "poisson" else 0.0))
    lam = np.full(len(x), float(options.get("damping", 1e-3)))
    history = []
    it = 0
    resumed = ckpt.load_gn() if ckpt is not None else None
    message, success = "the maximum number of iterations was reached", False
    still = 0
    if resumed is not None:
        x, lam, it, history, dropped, done, still = resumed
        prob.resumed = it
        prob.dropped.update(dropped)
        prob.active = [i for i in prob.active if i not in prob.dropped]
        if done is not None:
            return x, history, done[0], done[1], it
    while it < max_iter:
        res, _ = prob.run(x, "normal", f"iteration {it + 1}")      # drops the shots that fail here
        if not prob.active:
            raise ManyFitError("every shot was dropped: " + "; ".join(f"shot {i}: {r}"
                                                                     for i, r in sorted(prob.dropped.items())))
        f0 = prob.value(x, res)
        if not history:
            history.append(f0)
        S0, gs, blocks, g = normal_equations(prob, x, res)
        accepted = False
        improved = set()
        lam_start = lam.copy()
        for trial in range(MAX_TRIALS):
            if trial:
                # the whole step was refused: more damping everywhere, from where this
                # iteration began
                lam = lam_start * 4.0 ** trial
            dx = schur_step(prob, S0, gs, blocks, lam)
            x_new = np.clip(x + dx, prob.lo, prob.hi)
            # (a shot that cannot be evaluated at the trial point, or whose model leaves an observed
            # photon without light, has an infinite loss: it is one of the worse)
            res_new, _ = prob.run(x_new, "value", f"iteration {it + 1}: trial", drop=False)
            res_new = _finite(res_new)
            worse = [i for i in prob.active if res_new[i]["value"] > res[i]["value"]]
            if worse and prob.np:
                # a shot whose loss rose: was it its own step, or the shared one?  Its loss
                # with the shared step alone says; it keeps its own step if that helps
                # there, else its own values (and four times the damping next time)
                held = x_new.copy()
                for i in worse:
                    held[prob.own_slice(i)] = x[prob.own_slice(i)]
                if prob.n_shared:
                    back = _finite(prob.run(held, "value", f"iteration {it + 1}: trial", drop=False,
                                            shots=worse)[0])
                else:
                    back = {i: res[i] for i in worse}
                for i in worse:
                    if back[i]["value"] < res_new[i]["value"]:
                        x_new[prob.own_slice(i)] = x[prob.own_slice(i)]
                        lam[prob.own_slice(i)] = lam_start[prob.own_slice(i)] * 4.0
                        res_new[i] = back[i]
                worse = [i for i in worse if res_new[i] is back[i]]
            improved = set(prob.active) - set(worse)
            if not improved and not prob.n_shared:
                continue                      # nothing gained: more damping for everyone
            f1 = prob.value(x_new, res_new)
            if f1 <= f0:
                accepted = True
                break
        it += 1
        if not accepted:
            history.append(f0)
            message, success = "no step lowers the loss (converged at the resolution of the arithmetic)", True
            break
        step = np.abs(x_new - x)
        _log.info("iteration %d: loss %.10g, shared damping %.3g, shots' median damping %.3g, %d shots damped; "
                  "largest step %.3g (parameter %d)", it, f1, lam[0] if prob.n_shared else 0.0,
                  float(np.median(lam[prob.n_shared:])) if prob.np else 0.0, len(prob.active) - len(improved),
                  float(step.max()), int(step.argmax()))
        x = x_new
        prob.drop_diverged(x)
        lam[:prob.n_shared] = np.maximum(lam[:prob.n_shared] / 3.0, 1e-12)
        for i in improved:          # the shots that took their own step: less damping next time
            own = prob.own_slice(i)
            lam[own] = np.maximum(lam[own] / 3.0, 1e-12)
        history.append(f1)
        # still when no shot that refused its step could take a real one next time (its
        # damping still small: a few shots far from their minimum move the total little
        # but are not done), or after STILL_ITERATIONS such iterations in a row
        waiting = [i for i in prob.active if prob.np and i not in improved
                   and np.min(lam[prob.own_slice(i)]) < SETTLED]
        small = f0 - f1 <= ftol * abs(f1) + atol or np.all(step <= xtol * np.maximum(np.abs(x), 1.0))
        still = still + 1 if small else 0
        if ckpt is not None:
            ckpt.save_gn(x, lam, it, history, prob.dropped, still=still)
        if small and (not waiting or still >= STILL_ITERATIONS):
            message, success = "the loss stopped decreasing", True
            break
    if ckpt is not None:
        ckpt.save_gn(x, lam, it, history, prob.dropped, done=(success, message))
    return x, history, success, message, it


MAX_TRIALS = 12
STILL_ITERATIONS = 5
SETTLED = 1e3          # a shot's damping past which its steps are too small to matter
MISSET_RANGE = 2.0      # degrees either side of a shot's starting misset (its default bounds)


def _finite(results):
    """Trial results with a failed evaluation counted as an infinite loss."""
    return {i: r if "error" not in r else {"value": np.inf} for i, r in results.items()}


# ----------------------------------------------------------------------------- L-BFGS

def _lbfgs(prob, x0, options, ckpt):
    from scipy import optimize
    res, _ = prob.run(x0, "normal", "curvature")
    S0, _, blocks, _ = normal_equations(prob, x0, res)
    curv = np.zeros(len(x0))
    curv[:prob.n_shared] = np.diag(S0)
    for i in prob.active:
        curv[prob.own_slice(i)] = np.diag(blocks[i][2])
    scale = 1.0 / np.sqrt(np.maximum(curv, 1e-300))
    scale[curv <= 0] = 1.0
    val0 = max(prob.value(x0, res), 1e-300)
    history = []

    def f(z):
        x = np.clip(x0 + z * scale, prob.lo, prob.hi)
        k = prob.evaluations
        cached = ckpt.load_eval(k, x) if ckpt is not None else None
        if cached is not None:
            v, g, dropped = cached
            prob.evaluations += 1
            prob.resumed += 1
            if dropped != prob.dropped:
                prob.dropped.update(dropped)
                prob.active = [i for i in prob.active if i not in prob.dropped]
                raise _Restart(x)
        else:
            r, failed = prob.run(x, "gradient", f"evaluation {k + 1}")
            if failed:
                if ckpt is not None:
                    ckpt.save_eval(k, x, np.nan, np.zeros_like(x), prob.dropped)
                raise _Restart(x)
            v, g = prob.value(x, r), prob.gradient(x, r)
            if ckpt is not None:
                ckpt.save_eval(k, x, v, g, prob.dropped)
        history.append(v)
        return v / val0, g * scale / val0

    opts = dict(maxiter=int(options.get("max_iterations", 500)), ftol=float(options.get("ftol", 1e-12)),
                gtol=float(options.get("gtol", 1e-8)), maxcor=20)
    zlo = np.where(np.isfinite(prob.lo), (prob.lo - x0) / scale, -np.inf)
    zhi = np.where(np.isfinite(prob.hi), (prob.hi - x0) / scale, np.inf)
    x = x0
    while True:
        try:
            z0 = (x - x0) / scale
            out = optimize.minimize(f, z0, jac=True, method="L-BFGS-B", bounds=list(zip(zlo, zhi)), options=opts)
            x = np.clip(x0 + out.x * scale, prob.lo, prob.hi)
            prob.drop_diverged(x)
            return x, history, bool(out.success), str(out.message), int(out.nit)
        except _Restart as r:
            x = r.x                       # a shot dropped: start again from here without it
            if not prob.active:
                raise ManyFitError("every shot was dropped") from None


class _Restart(Exception):
    def __init__(self, x):
        self.x = x


# ----------------------------------------------------------------------------- checkpoints

class _Checkpoint:
    """A directory of the run's state, each file written whole (temporary + rename)."""

    def __init__(self, path, fingerprint):
        self.path = path
        os.makedirs(path, exist_ok=True)
        self.fingerprint = fingerprint
        stamp = os.path.join(path, "problem.json")
        if os.path.exists(stamp):
            with open(stamp) as fh:
                old = json.load(fh).get("fingerprint")
            if old != fingerprint:
                raise ManyFitError(f"checkpoint {path!r} belongs to another problem (other shots, parameters or "
                                   f"starting values): use a new directory or remove it")
        else:
            self._write_json(stamp, {"fingerprint": fingerprint})

    @staticmethod
    def _write_json(path, obj):
        tmp = path + ".part"
        with open(tmp, "w") as fh:
            json.dump(obj, fh)
        os.replace(tmp, path)

    def _write_npz(self, name, **arrays):
        final = os.path.join(self.path, name)
        tmp = final + ".part.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, final)

    @staticmethod
    def _dropped_arrays(dropped):
        keys = sorted(dropped)
        return np.array(keys, dtype=np.int64), np.array([dropped[k] for k in keys], dtype=str)

    def save_gn(self, x, lam, it, history, dropped, done=None, still=0):
        """The state after an iteration; ``done`` = (success, message) once the run ended."""
        di, dr = self._dropped_arrays(dropped)
        self._write_npz("state.npz", x=x, lam=lam, it=it, still=still, history=np.array(history), dropped_index=di,
                        dropped_reason=dr, done=done is not None, success=bool(done and done[0]),
                        message=str(done[1]) if done else "")

    def load_gn(self):
        p = os.path.join(self.path, "state.npz")
        if not os.path.exists(p):
            return None
        with np.load(p) as z:
            done = (bool(z["success"]), str(z["message"])) if bool(z["done"]) else None
            return (z["x"].copy(), z["lam"].copy(), int(z["it"]), list(z["history"]),
                    dict(zip(z["dropped_index"].tolist(), z["dropped_reason"].tolist())), done, int(z["still"]))

    def save_eval(self, k, x, v, g, dropped):
        di, dr = self._dropped_arrays(dropped)
        self._write_npz(f"eval_{k:06d}.npz", x=x, v=v, g=g, dropped_index=di, dropped_reason=dr)

    def load_eval(self, k, x):
        p = os.path.join(self.path, f"eval_{k:06d}.npz")
        if not os.path.exists(p):
            return None
        with np.load(p) as z:
            if z["x"].shape != x.shape or not np.array_equal(z["x"], x):
                return None
            return (float(z["v"]), z["g"].copy(),
                    dict(zip(z["dropped_index"].tolist(), z["dropped_reason"].tolist())))


def _fingerprint(shots, shared, own, x0, method, loss, space_group, restraints):
    h = hashlib.sha256()
    h.update(json.dumps([list(shared), list(own), method, loss, str(space_group), len(shots)]).encode())
    h.update(np.ascontiguousarray(x0).tobytes())
    for at, target, sigma in restraints:
        h.update(np.ascontiguousarray(np.atleast_1d(target), dtype=float).tobytes())
        h.update(np.ascontiguousarray(np.atleast_1d(sigma), dtype=float).tobytes())
    for s in shots:
        obs = s.observed
        if isinstance(obs, FrameRef):
            h.update(f"{os.path.abspath(obs.path)}:{obs.index}:{obs.dataset}".encode())
        else:
            h.update(hashlib.sha256(np.ascontiguousarray(obs, dtype=np.float64).tobytes()).digest())
    return h.hexdigest()[:24]


# ----------------------------------------------------------------------------- refine_many

def _grid_like(v, grid0, what):
    a = np.asarray(v, dtype=float)
    if a.ndim and a.shape != grid0.shape:
        raise ParameterError(f"restraints['Fhkl']: {what} has shape {a.shape}; the grid is {grid0.shape}")
    return np.broadcast_to(a, grid0.shape)


def _check_names(shared, per_shot):
    shared = list(shared)
    own = list(per_shot)
    for n in own:
        if n == "Fhkl":
            raise ParameterError("'Fhkl' is shared by every shot: list it in shared=, not per_shot=")
    for n in shared:
        if n in SHOT_ONLY:
            raise ParameterError(f"{n!r} is a per-shot factor: list it in per_shot=")
    check_names([n for n in shared if n not in SHOT_ONLY])
    check_names([n for n in own if n not in SHOT_ONLY], allow_arrays=False)
    both = set(shared) & set(own)
    if both:
        raise ParameterError(f"parameter {sorted(both)[0]!r} is listed as both shared and per shot")
    for group in (shared, own):
        if len(set(group)) != len(group):
            raise ParameterError(f"a parameter is listed twice: {group}")
    if not shared and not own:
        raise ParameterError("no parameters to refine (shared= and per_shot= are empty)")
    from .params import RESPONSE_PARAMS
    for n in shared + own:
        if n in RESPONSE_PARAMS:
            raise ParameterError(f"parameter {n!r} belongs to the detector response: refine_many fits photons")
    return [n for n in shared if n != "Fhkl"], "Fhkl" in shared, own


def _observed_list(observed, nshots):
    if isinstance(observed, (str, os.PathLike)):
        return [FrameRef(os.fspath(observed), i) for i in range(nshots)]
    obs = list(observed)
    if len(obs) != nshots:
        raise ParameterError(f"observed holds {len(obs)} images for {nshots} experiments")
    return [o if isinstance(o, FrameRef) else np.asarray(o, dtype=np.float64) for o in obs]


def refine_many(experiments, observed, shared=(), per_shot=(), loss="poisson", method="gauss_newton", *,
                masks=None, bounds=None, restraints=None, space_group=None, min_observations=1,
                min_photons=1.0, stages=None, workers=None, scheduler=None, threads_per_worker=1,
                checkpoint=None, progress=True, **options):
    """Refine shared and per-shot parameters of many shots together.

    Parameters
    ----------
    experiments : sequence of Experiment, one per shot (the starting models).  Shared
        scalar parameters start from the first shot's values; with ``"Fhkl"`` every
        shot must hold a structure-factor grid of the same shape and origin (the first
        shot's values are the start).
    observed : sequence of images in photons, one per shot (arrays, or :class:`FrameRef`
        read when used), or the path of an ``nbragg-dataset`` file (frame i for shot i)
    shared : names refined once for every shot (:mod:`nbragg.params`; ``"Fhkl"``)
    per_shot : names refined for each shot (scalar parameters, and ``"scale"``)
    loss : "poisson" (deviance) or "l2"
    method : "gauss_newton" (Levenberg-Marquardt with the Schur complement) or "lbfgs"
    masks : optional sequence of boolean images (True where fitted), one per shot
    bounds : {name: (lower, upper)} applied to the shared value and to every shot's
        value (defaults as :func:`nbragg.refine`; structure factors >= 0, scale > 0, a
        shot's misset within 2 degrees of its start).  A shot whose own parameter reaches
        a bound (other than a physical limit) has diverged: it is dropped.
    restraints : {name: (target, sigma)}: a term ((value - target) / sigma)^2 per shared
        value (``"Fhkl"``: target None for the starting values, or a grid; sigma a
        number or a grid in the grid's units); for a per-shot name, one term per shot
    space_group : None (each grid point its own value) or a space group (symbol or
        number; needs gemmi) whose symmetry and Friedel mates share one value
    min_observations, min_photons : a structure factor is refined when at least
        ``min_observations`` shots give it at least ``min_photons`` expected photons in
        their fitted pixels at the start (0: every value of the grid)
    stages : optional list of lists of names refined in turn (the others held) before
        the final fit of everything, e.g. ``[["misset_x", "misset_y", "misset_z",
        "Ncells", "scale"]]``: each shot's own parameters settle against the starting
        structure factors before these move
    workers : None (a local Dask cluster with one worker per core, at most one per
        shot), 0 (this process), or a number of local worker processes
    scheduler : the address of an existing Dask scheduler (instead of a local cluster)
    threads_per_worker : Numba threads per shot evaluation; the same for any number of
        workers, so the answer is the same bit for bit
    checkpoint : a directory for resuming a killed run
    progress : a tqdm bar per iteration
    options : max_iterations; Gauss-Newton: ftol, atol (stop when an iteration lowers
        the loss by less than ftol * loss + atol; atol 0.01 per shot for the Poisson
        deviance, 0 for l2), xtol, damping (the starting Marquardt factor); L-BFGS: ftol,
        gtol

    Returns
    -------
    ManyFit
    """
    t0 = time.perf_counter()
    if loss not in LOSSES:
        raise ParameterError(f"loss = {loss!r}; refine_many takes one of {', '.join(LOSSES)}")
    if method not in METHODS:
        raise ParameterError(f"method = {method!r}; choose one of {', '.join(METHODS)}")
    unknown = set(options) - {"max_iterations", "ftol", "atol", "xtol", "damping", "gtol"}
    if unknown:
        raise ParameterError(f"refine_many: unknown option {sorted(unknown)[0]!r}")
    setup = _setup(experiments, observed, shared, per_shot, loss, masks, space_group, threads_per_worker)
    setup.experiments = list(experiments)
    restraints = dict(restraints or {})
    for n in restraints:
        if n not in setup.shared_names + setup.own_names + (["Fhkl"] if setup.has_F else []):
            raise ParameterError(f"restraints: {n!r} is not among the refined parameters")
    everything = list(shared) + list(per_shot)
    plan = []
    for k, st in enumerate(stages or []):
        st = [st] if isinstance(st, str) else list(st)
        bad = [n for n in st if n not in everything]
        if bad:
            raise ParameterError(f"stages[{k}]: {bad[0]!r} is not among the refined parameters")
        plan.append(st)
    plan.append(everything)
    executor = _executor(setup.shots, workers, scheduler)
    try:
        current, scales, dropped, fit = setup.experiments, [1.0] * len(setup.shots), {}, None
        history, evaluations, iterations, resumed = [], 0, 0, 0
        for k, names in enumerate(plan):
            last = k == len(plan) - 1
            if len(plan) > 1:           # this stage's names, from where the last one ended
                setup = _setup(current, observed, [n for n in shared if n in names],
                               [n for n in per_shot if n in names], loss, masks, space_group, threads_per_worker,
                               scales)
                executor.load(setup.shots)
            kept = {n: v for n, v in restraints.items() if n in names}
            prob, observations = _build_problem(setup, executor, bounds, kept, min_observations, min_photons,
                                                progress, exclude=dropped)
            where = checkpoint if checkpoint is None or len(plan) == 1 else os.path.join(checkpoint, f"stage_{k}")
            fit = _run(setup, prob, observations, method, loss, space_group, where, options, t0, fold_scale=last)
            dropped = dict(fit.dropped)
            history += fit.history
            evaluations += fit.evaluations
            iterations += fit.iterations
            resumed += fit.resumed
            if not last:
                # dropped shots keep their own values but take the shared ones (the next
                # stage reads the shared start from the first shot)
                moved = {n: v for n, v in fit.shared.items() if n != "Fhkl"}
                if "Fhkl" in fit.shared:
                    moved["Fhkl"] = fit.shared["Fhkl"]
                current = [e if e is not None else (set_params(current[i], moved) if moved else current[i])
                           for i, e in enumerate(fit.experiments)]
                if "scale" in names:
                    scales = [p["scale"] if p is not None else scales[i] for i, p in enumerate(fit.per_shot)]
        fit.history, fit.evaluations, fit.iterations, fit.resumed = history, evaluations, iterations, resumed
        if len(plan) > 1:
            fit.start_shared = {n: v for n, v in get_params(experiments[0], [n for n in shared
                                                                             if n not in ("Fhkl",)]).items()}
        return fit
    finally:
        executor.close()


def many_gradient(experiments, observed, shared=(), per_shot=(), loss="poisson", *, masks=None,
                  space_group=None, workers=0, scheduler=None, threads_per_worker=1, progress=False):
    """The loss :func:`refine_many` minimises (no restraints) and its gradient at the
    experiments' values: (value, {"shared": {name: gradient}, "per_shot": [{name:
    gradient}, ...], "Fhkl_hkl": ...}).  ``Fhkl``'s gradient is a grid (zero where no
    shot sees it), or with a space group one value per reflection of ``Fhkl_hkl`` (the
    sum over its symmetry mates).  The shared parts are the per-shot adjoint passes
    summed in shot order."""
    setup = _setup(experiments, observed, shared, per_shot, loss, masks, space_group, threads_per_worker)
    executor = _executor(setup.shots, workers, scheduler)
    try:
        prob, _ = _build_problem(setup, executor, None, None, 0, 0.0, progress)
        res, _ = prob.run(prob.x0, "gradient", "gradient")
    finally:
        executor.close()
    g = prob.gradient(prob.x0, res)
    ns = prob.ns
    out = {"shared": {n: float(g[k]) for k, n in enumerate(setup.shared_names)}, "per_shot": []}
    if setup.has_F:
        gF = g[ns:prob.n_shared]
        if prob.fmap.space_group is None:      # one grid point per value: the grid's gradient
            gF = prob.fmap.expand(gF, np.zeros(setup.grid0.shape))
        out["shared"]["Fhkl"] = gF
        out["Fhkl_hkl"] = prob.fmap.hkl
    for i in range(len(setup.shots)):
        out["per_shot"].append(None if i in prob.dropped else
                               {n: float(v) for n, v in zip(setup.own_names, g[prob.own_slice(i)])})
    return prob.value(prob.x0, res), out


@dataclass
class _Setup:
    shots: list
    shared_names: list
    has_F: bool
    own_names: list
    start_shared: dict
    own_start: list
    grid0: Optional[np.ndarray]
    fmap: Optional[FhklMap]


def _executor(shots, workers, scheduler):
    if workers is None and scheduler is None:
        workers = min(os.cpu_count() or 1, len(shots))
    if scheduler is None:
        try:
            workers = int(workers)
        except (TypeError, ValueError):
            raise ParameterError(f"workers = {workers!r} is not a whole number") from None
        if workers < 0:
            raise ParameterError(f"workers = {workers}: give 0 (this process) or more")
        if workers == 0:
            return _Serial(shots)
    return _Dask(shots, workers, scheduler)


def _setup(experiments, observed, shared, per_shot, loss, masks, space_group, threads, scales=None):
    from .experiment import Experiment
    if loss not in LOSSES:
        raise ParameterError(f"loss = {loss!r}; refine_many takes one of {', '.join(LOSSES)}")
    experiments = list(experiments)
    if not experiments:
        raise ParameterError("refine_many: no experiments")
    for k, e in enumerate(experiments):
        if not isinstance(e, Experiment):
            raise ParameterError(f"experiments[{k}] is a {type(e).__name__}, not an nbragg.Experiment")
    nshots = len(experiments)
    obs = _observed_list(observed, nshots)
    if masks is not None:
        masks = list(masks)
        if len(masks) != nshots:
            raise ParameterError(f"masks holds {len(masks)} images for {nshots} experiments")
    shared_names, has_F, own_names = _check_names(shared, per_shot)
    # starting values: shared from the first shot, set on every shot
    first = experiments[0]
    start_shared = get_params(first, shared_names) if shared_names else {}
    grid0, fmap = None, None
    if has_F:
        st = first.structure
        if st.Fhkl is None:
            raise ParameterError("shared 'Fhkl': experiments[0] has no structure-factor grid (give -hkl, -mtz...)")
        for k, e in enumerate(experiments):
            s = e.structure
            if s.Fhkl is None or s.Fhkl.shape != st.Fhkl.shape or tuple(s.hkl_origin) != tuple(st.hkl_origin):
                raise ParameterError(f"shared 'Fhkl': experiments[{k}]'s structure-factor grid differs in shape or "
                                     f"origin from experiments[0]'s")
        grid0 = np.array(st.Fhkl)
        fmap = FhklMap(grid0, st.hkl_origin, space_group)
    own_start = []
    for e in experiments:
        v = get_params(e, [n for n in own_names if n not in SHOT_ONLY])
        v.update({n: 1.0 if scales is None else float(scales[len(own_start)]) for n in own_names if n in SHOT_ONLY})
        own_start.append(v)
    try:
        threads = int(threads)
    except (TypeError, ValueError):
        raise ParameterError(f"threads_per_worker = {threads!r} is not a whole number") from None
    if threads < 1:
        raise ParameterError(f"threads_per_worker = {threads}: at least 1")
    shots = [_Shot(k, e, obs[k], None if masks is None else masks[k], loss, tuple(shared_names),
                   tuple(own_names), threads) for k, e in enumerate(experiments)]
    return _Setup(shots, shared_names, has_F, own_names, start_shared, own_start, grid0, fmap)


def _build_problem(setup, executor, bounds, restraints, min_observations, min_photons, progress, exclude=None):
    """Survey the shots at the start (drop those without spots, find the structure
    factors seen), then the parameter vector, its bounds and restraints."""
    from .refine import _bounds
    shots, shared_names, has_F, own_names = setup.shots, setup.shared_names, setup.has_F, setup.own_names
    start_shared, own_start, grid0, fmap = setup.start_shared, setup.own_start, setup.grid0, setup.fmap
    restraints = dict(restraints or {})
    nshots = len(shots)
    dropped = dict(exclude or {})
    # survey at the start: shots without spots, and which structure factors are seen
    shared_state = (start_shared, grid0, fmap.classes if has_F else None)
    own = {s.index: (own_start[s.index], None) for s in shots}
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=nshots, desc="survey", unit="shot", leave=False)
    try:
        survey = executor.run("survey", shared_state, own, [s.index for s in shots if s.index not in dropped], bar)
    finally:
        if bar is not None:
            bar.close()
    seen = {}
    for i in range(nshots):
        if i in dropped:
            continue
        r = survey[i]
        if "error" in r:
            dropped[i] = f"cannot be simulated: {r['error']}"
        elif not r["photons"] > 0.0:
            dropped[i] = "no spots: the model puts no Bragg photons in the fitted pixels"
        elif has_F:
            for c in r["classes"][r["class_photons"] >= min_photons]:
                seen[int(c)] = seen.get(int(c), 0) + 1
    active = [i for i in range(nshots) if i not in dropped]
    if not active:
        raise ManyFitError("no shot can be refined: " + "; ".join(f"shot {i}: {r}" for i, r in sorted(dropped.items())))
    observations = None
    if has_F:
        if int(min_observations) <= 0:      # every value of the grid
            refined = np.unique(fmap.classes[fmap.classes >= 0])
        else:
            refined = np.array(sorted(c for c, k in seen.items() if k >= int(min_observations)), dtype=np.int64)
        fmap.select(refined)
        observations = np.array([seen.get(int(c), 0) for c in refined], dtype=np.int64)
    # the parameter vector, its bounds and restraints
    ns, nF, npar = len(shared_names), (fmap.size if has_F else 0), len(own_names)
    x0 = np.zeros(ns + nF + npar * nshots)
    x0[:ns] = [start_shared[n] for n in shared_names]
    if has_F:
        x0[ns:ns + nF] = fmap.values(grid0)
    for i in range(nshots):
        x0[ns + nF + i * npar: ns + nF + (i + 1) * npar] = [own_start[i][n] for n in own_names]
    lo = np.full(len(x0), -np.inf)
    hi = np.full(len(x0), np.inf)
    user = dict(bounds or {})
    unknown = [n for n in user if n not in shared_names + own_names + ["Fhkl"]]
    if unknown:
        raise ParameterError(f"bounds[{unknown[0]!r}]: {unknown[0]!r} is not among the refined parameters")
    if ns:
        lo[:ns], hi[:ns] = _bounds(shared_names, {n: v for n, v in user.items() if n in shared_names}, start_shared)
    if has_F:
        lo[ns:ns + nF], hi[ns:ns + nF] = user.get("Fhkl", (0.0, np.inf))
    scalar_own = [n for n in own_names if n not in SHOT_ONLY]
    for i in range(nshots):
        a = ns + nF + i * npar
        if scalar_own:
            # a shot's misset stays within MISSET_RANGE of its start unless told otherwise:
            # one that reaches the edge has diverged (and is dropped)
            mine = {n: (own_start[i][n] - MISSET_RANGE, own_start[i][n] + MISSET_RANGE)
                    for n in scalar_own if n.startswith("misset_")}
            mine.update({n: v for n, v in user.items() if n in scalar_own})
            l_, h_ = _bounds(scalar_own, mine, own_start[i])
            for n, lv, hv in zip(scalar_own, l_, h_):
                lo[a + own_names.index(n)], hi[a + own_names.index(n)] = lv, hv
        if "scale" in own_names:
            lo[a + own_names.index("scale")], hi[a + own_names.index("scale")] = user.get("scale", (0.0, np.inf))
    terms = []
    for n, (target, sigma) in restraints.items():
        if n == "Fhkl":
            at = np.arange(ns, ns + nF)
            t = x0[at] if target is None else fmap.values(_grid_like(target, grid0, "target"))
            sg = fmap.values(_grid_like(sigma, grid0, "sigma"))
            terms.append((at, t, sg))
        elif n in shared_names:
            at = np.array([shared_names.index(n)])
            terms.append((at, np.array([float(target)]), np.array([float(sigma)])))
        else:
            at = np.array([ns + nF + i * npar + own_names.index(n) for i in range(nshots)])
            terms.append((at, np.full(nshots, float(target)), np.full(nshots, float(sigma))))
    for at, t, sg in terms:
        if np.any(~(np.asarray(sg) > 0)):
            raise ParameterError("restraints: every sigma must be > 0")
    prob = _Problem(shots, shared_names, own_names, fmap if has_F else None, grid0, x0, lo, hi, terms, executor,
                    progress)
    prob.active = active
    prob.dropped = dropped
    prob.keep = {i: survey[i].get("keep") for i in active}
    return prob, observations


def _run(setup, prob, observations, method, loss, space_group, checkpoint, options, t0, fold_scale=True):
    shots, shared_names, has_F, own_names = setup.shots, setup.shared_names, setup.has_F, setup.own_names
    fmap, grid0, x0 = setup.fmap, setup.grid0, prob.x0
    ns, nF, nshots = prob.ns, prob.nF, len(shots)
    ckpt = None
    if checkpoint is not None:
        ckpt = _Checkpoint(os.fspath(checkpoint), _fingerprint(shots, shared_names + (["Fhkl"] if has_F else []),
                                                                own_names, x0, method, loss, space_group,
                                                                prob.restraints))
    if method == "gauss_newton":
        x, history, success, message, iterations = _gauss_newton(prob, x0.copy(), options, ckpt)
    else:
        x, history, success, message, iterations = _lbfgs(prob, x0.copy(), options, ckpt)
    # uncertainties from the Gauss-Newton matrix at the answer
    res, _ = prob.run(x, "normal", "uncertainties")
    final = prob.value(x, res)
    S0, _, blocks, _ = normal_equations(prob, x, res)
    var_shared, var_own = _covariance_diag(prob, S0, blocks, loss)
    if loss == "l2":
        fitted = prob.n_shared + prob.np * len(prob.active)
        dof = sum(res[i]["pixels"] for i in prob.active) - fitted
        sigma2 = final / max(dof, 1)
        var_shared = var_shared * sigma2
        var_own = {i: v * sigma2 for i, v in var_own.items()}
    sd_shared = np.sqrt(np.maximum(var_shared, 0.0))
    state, own_vals = prob.state(x)
    out_shared = {n: float(x[k]) for k, n in enumerate(shared_names)}
    out_sd = {n: float(sd_shared[k]) for k, n in enumerate(shared_names)}
    reflections = None
    if has_F:
        out_shared["Fhkl"] = state[1]
        sd_grid = fmap.expand(sd_shared[ns:ns + nF], np.full(grid0.shape, np.nan))
        out_sd["Fhkl"] = sd_grid
        reflections = {"h": fmap.hkl[:, 0].copy(), "k": fmap.hkl[:, 1].copy(), "l": fmap.hkl[:, 2].copy(),
                       "F": x[ns:ns + nF].copy(), "sigF": sd_shared[ns:ns + nF].copy(),
                       "observations": observations}
    per_shot, per_sd, exps = [], [], []
    for i in range(nshots):
        if i in prob.dropped:
            per_shot.append(None)
            per_sd.append(None)
            exps.append(None)
            continue
        per_shot.append(own_vals[i][0])
        per_sd.append({n: float(np.sqrt(max(v, 0.0))) for n, v in zip(own_names, var_own[i])})
        exps.append(shot_experiment(shots[i], state[0], state[1], own_vals[i][0], fold_scale=fold_scale))
    return ManyFit(shared=out_shared, per_shot=per_shot, shared_uncertainties=out_sd, per_shot_uncertainties=per_sd,
                   history=history, success=success, message=message, dropped=dict(sorted(prob.dropped.items())),
                   experiments=exps, reflections=reflections, iterations=iterations, evaluations=prob.evaluations,
                   wall_time=time.perf_counter() - t0, final_loss=final, method=method, loss=loss,
                   space_group=fmap.space_group if has_F else None, start_shared=dict(setup.start_shared),
                   resumed=prob.resumed)


from ._callable import make_callable  # noqa: E402  (after refine_many exists)

make_callable(__name__, "refine_many")
