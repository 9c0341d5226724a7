"""Exact gradients and Jacobians of the image with respect to named parameters.

``gradient`` runs the adjoint kernel once (any number of parameters, O(pixels) memory);
``jacobian`` runs the tangent kernel (one derivative image per scalar parameter);
``check_gradients`` compares either with central finite differences.

With ``detected=True`` they differentiate the detector's expected signal instead of the
photons: E = adc + gain * PSF * (scale * calibration * I) (``Experiment.response``; no
flicker, no noise), which adds the response's parameters (psf_fwhm, gain,
response_scale, adc).  E is linear in I, so the kernels' derivatives pass through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .engine import adjoint_image, build_model, check_backend, render, tangent_image
from .errors import ParameterError
from .params import RESPONSE_PARAMS, check_names, geometry, get_params, input_tangent, set_params


@dataclass
class RawGradient:
    """dL/d(scene inputs) for L = sum(upstream * image): ``flat`` in the model's layout
    (see :mod:`nbragg.kernels.scene`), ``Fgrid`` for the structure-factor grid, and the
    image the adjoint computed on its way (when asked for)."""

    flat: np.ndarray
    Fgrid: np.ndarray
    image: np.ndarray = None

    def contract(self, tangent):
        """sum_u dL/du . du/dtheta for one tangent (a flat vector in the same layout)."""
        return float(self.flat @ tangent)


def _check_upstream(model, upstream):
    g = np.asarray(upstream, dtype=np.float64)
    if g.shape != model.shape:
        raise ParameterError(f"upstream has shape {g.shape}; the image has shape {model.shape}")
    if not np.all(np.isfinite(g)):
        raise ParameterError("upstream holds NaN or infinite values")
    return np.ascontiguousarray(g)


def raw_gradient(model, upstream, threads=None, want_image=False, backend="cpu", want_F=True):
    """Adjoint kernel: dL/du for every scene input u, with L = sum(upstream * image).

    With ``want_image`` the (scaled) image is returned too, for the pixels where the
    upstream is not zero.  ``want_F=False`` lets the GPU skip the structure-factor
    partials (``Fgrid`` is then zero)."""
    g = _check_upstream(model, upstream)
    flat, gF, image = adjoint_image(model, g, backend=backend, threads=threads, want_image=want_image,
                                    want_F=want_F)
    return RawGradient(flat=flat, Fgrid=gF, image=image)


def _response_of(exp, names, detected):
    """The response to differentiate through (None for the photons), checked."""
    own = [n for n in names if n in RESPONSE_PARAMS]
    if not detected:
        if own:
            raise ParameterError(f"parameter {own[0]!r} belongs to the detector response: its derivative is that of "
                                 f"the detected signal (pass detected=True)")
        return None
    if exp.response is None:
        raise ParameterError("detected=True needs a detector response (Experiment.response is None)")
    return exp.response


def gradient(exp, names, upstream, backend="cpu", threads=None, detected=False):
    """sum_i upstream_i dI_i/dtheta for each named parameter.

    Parameters
    ----------
    exp : Experiment
    names : parameter names (see :mod:`nbragg.params`)
    upstream : array of the image's shape, dL/dI for the loss L (dL/dE with ``detected``)
    detected : differentiate the detector's expected signal E (see the module)
    Returns
    -------
    dict name -> float (an array of the grid's shape for ``Fhkl``, of the channels for
    ``spectrum_weights``)
    """
    check_backend(backend)
    names = check_names(names)
    response = _response_of(exp, names, detected)
    model = build_model(exp, warn=lambda m: None)
    u = _check_upstream(model, upstream)
    own = [n for n in names if n in RESPONSE_PARAMS]
    if response is not None:
        from .response import response_derivatives, signal_vjp
        pixel = exp.detector.pixel_size
        if own:
            image = render(model, threads=threads, backend=backend)[0]
            own_grads = {n: float(np.sum(u * dE)) for n, dE in response_derivatives(image, response, pixel, own).items()}
        u = signal_vjp(u, response, pixel)
    raw = raw_gradient(model, u, threads=threads, backend=backend, want_F="Fhkl" in names)
    out = {}
    for n in names:
        if n == "Fhkl":
            if exp.structure.Fhkl is None:
                raise ParameterError("parameter 'Fhkl': the experiment has no structure-factor grid (no -hkl)")
            out[n] = raw.Fgrid.copy()
        elif n == "spectrum_weights":
            out[n] = spectrum_weights_gradient(model, raw)
        elif n in own:
            out[n] = own_grads[n]
        else:
            out[n] = raw.contract(input_tangent(model, n))
    return out


def spectrum_weights_gradient(model, raw):
    """dL/d(Beam.spectrum weights) from the adjoint's dL/d(source weights)."""
    from .kernels.scene import field_slice
    from .models.beam import spectrum_weight_jacobian
    from .params import get_params
    get_params(model.experiment, ["spectrum_weights"])          # (says so when there is no spectrum)
    Jw, Jl = spectrum_weight_jacobian(model.experiment.beam, model.sources)
    return (Jw.T @ raw.flat[field_slice(model.layout, "weights")]
            + Jl.T @ raw.flat[field_slice(model.layout, "lambdas")])


def jacobian(exp, names, backend="cpu", threads=None, return_image=False, detected=False):
    """dI/dtheta for scalar parameters: an array (spixels * fpixels, n), rows in image
    order (fast index fastest), zero outside the ROI and mask.  With ``detected``, dE/dtheta
    for the detector's expected signal E (see the module): the PSF spreads it past the ROI's
    edges, and the adc column is 1 everywhere.

    With ``return_image``, (J, image): the image (E with ``detected``) comes from the same
    pass, and on the CPU the photons are ``simulate(exp).image`` bit for bit."""
    check_backend(backend)
    names = check_names(names, allow_arrays=False)
    if not names:
        raise ParameterError("jacobian: no parameter names given")
    response = _response_of(exp, names, detected)
    model = build_model(exp, warn=lambda m: None)
    d = np.array([input_tangent(model, n) for n in names]).reshape(len(names), model.layout.size)
    J, image = tangent_image(model, d, threads=threads, backend=backend)
    if response is not None:
        J, image = detected_jacobian(J, image, names, response, exp.detector.pixel_size)
    J = J.reshape(-1, len(names))
    return (J, image) if return_image else J


def detected_jacobian(J, image, names, response, pixel_size_mm):
    """(dE/dtheta, E) from the photons' (dI/dtheta, I): J has a trailing axis of
    parameters; the response's own parameters get their columns here."""
    from .response import expected_signal, response_derivatives, signal_tangent
    own = response_derivatives(image, response, pixel_size_mm, [n for n in names if n in RESPONSE_PARAMS])
    out = np.empty_like(J)
    for p, n in enumerate(names):
        out[..., p] = own[n] if n in own else signal_tangent(J[..., p], response, pixel_size_mm)
    return out, expected_signal(image, response, pixel_size_mm)


@dataclass
class GradientCheck:
    """Analytic against central-difference derivatives, one row per parameter.

    Each row is (name, analytic, numeric, relative error, step, sweep) where ``sweep``
    lists (step, numeric, relative error) for every step tried and the row reports the
    step with the smallest error.  With a good analytic derivative the error falls as
    step^2 for large steps until round-off takes over.
    """

    rows: list = field(default_factory=list)

    def table(self):
        lines = ["%-16s %22s %22s %10s %10s" % ("parameter", "analytic", "finite difference", "rel.error", "step")]
        for name, a, n, e, h, _ in self.rows:
            lines.append("%-16s %22.12e %22.12e %10.2e %10.3g" % (name, a, n, e, h))
        return "\n".join(lines)

    def sweep_table(self):
        lines = []
        for name, a, n, e, h, sweep in self.rows:
            lines.append(f"{name}: analytic {a:.12e}")
            for hh, nn, ee in sweep:
                lines.append("    step %10.3g  finite difference %22.12e  rel.error %9.2e" % (hh, nn, ee))
        return "\n".join(lines)

    def __str__(self):
        return self.table()

    @property
    def max_error(self):
        return max((r[3] for r in self.rows), default=0.0)


_FIXED_STEPS = {"cell_alpha": 0.05, "cell_beta": 0.05, "cell_gamma": 0.05, "misset_x": 0.05, "misset_y": 0.05,
                "misset_z": 0.05, "detector_rotx": 0.05, "detector_roty": 0.05, "detector_rotz": 0.05,
                "twotheta": 0.05, "phi0": 0.05, "osc": 0.05, "beam_x": 0.01, "beam_y": 0.01, "polar": 0.01,
                "mosaic_spread": 0.01, "distance": 0.05, "wavelength": 1e-3, "Na": 0.01, "Nb": 0.01, "Nc": 0.01}


def default_step(exp, name):
    """The largest central-difference step of a sweep (user units)."""
    if name in _FIXED_STEPS:
        return _FIXED_STEPS[name]
    if geometry(name):             # a panel or group shift (mm) or rotation (degrees)
        return 0.01 if geometry(name)[1] == "shift" else 0.05
    v = get_params(exp, [name])[name]
    return 1e-3 * abs(v) if v != 0 else 1e-3


def check_gradients(exp, names, upstream=None, steps=None, sweep=(1.0, 10 ** -0.5, 0.1, 10 ** -1.5, 0.01,
                                                                   10 ** -2.5, 1e-3), seed=0, threads=None,
                    backend="cpu", detected=False):
    """Compare the adjoint gradient of L = sum(w * I) with central differences (both
    computed on ``backend``; of the detector's expected signal with ``detected``).

    ``upstream`` defaults to random weights w in [0.5, 1.5); ``steps`` maps names to the
    largest finite-difference step (user units; see :func:`default_step`), which is
    multiplied by each factor in ``sweep``.  Returns a :class:`GradientCheck`: print it
    for a table, or ``.sweep_table()`` for every step.  ``Fhkl`` and ``spectrum_weights``
    are checked on the three entries with the largest gradients.
    """
    names = check_names(names)
    check_backend(backend)
    model = build_model(exp, warn=lambda m: None)
    w = np.random.default_rng(seed).uniform(0.5, 1.5, model.shape) if upstream is None else np.asarray(upstream)
    grads = gradient(exp, names, w, threads=threads, backend=backend, detected=detected)
    res = GradientCheck()

    def loss(e):
        image = render(build_model(e, warn=lambda m: None), backend=backend, threads=threads)[0]
        if detected:
            from .response import expected_signal
            image = expected_signal(image, e.response, e.detector.pixel_size)
        return float(np.sum(w * image))

    def row(label, a, f_plus_minus, h0):
        trials = []
        for fac in sweep:
            h = h0 * fac
            lp, lm = f_plus_minus(h)
            num = (lp - lm) / (2 * h)
            trials.append((h, num, abs(a - num) / max(abs(a), abs(num), 1e-300)))
        best = min(trials, key=lambda t: t[2])
        res.rows.append((label, a, best[1], best[2], best[0], trials))

    for n in names:
        if n in ("Fhkl", "spectrum_weights"):
            grid = get_params(exp, [n])[n]
            g = grads[n]
            for flat in np.argsort(-np.abs(g).ravel())[:3]:
                idx = np.unravel_index(flat, grid.shape)

                def pm(h, idx=idx, n=n):
                    gp, gm = grid.copy(), grid.copy()
                    gp[idx] += h
                    gm[idx] -= h
                    return loss(set_params(exp, {n: gp})), loss(set_params(exp, {n: gm}))
                h0 = 1e-2 * max(abs(grid[idx]), 1.0) if n == "Fhkl" else 1e-2 * abs(grid[idx])
                row(f"{n}{[int(i) for i in idx]}", float(g[idx]), pm, h0 or 1e-3)
            continue
        v = get_params(exp, [n])[n]

        def pm(h, n=n, v=v):
            return loss(set_params(exp, {n: v + h})), loss(set_params(exp, {n: v - h}))
        row(n, grads[n], pm, (steps or {}).get(n, default_step(exp, n)))
    return res
