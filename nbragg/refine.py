"""Refinement of model parameters against an observed image with scipy.optimize.

``refine`` fits named parameters (see :mod:`nbragg.params`) of an Experiment to an
observed image in photons:

* ``method="least_squares"``: scipy.optimize.least_squares (trust-region reflective)
  on residuals, with the analytic Jacobian from the tangent kernel and
  ``x_scale="jac"``;
* ``method="lbfgs"``: scipy.optimize.minimize (L-BFGS-B) on the same objective, with
  the exact gradient from one adjoint pass per evaluation, in parameters scaled by
  the Gauss-Newton curvature at the start.

Losses (both methods minimise the same function, so they find the same minimum):

* ``"poisson"``: the Poisson deviance 2 sum(m - o - o log(m/o)); least squares uses the
  signed deviance residuals, L-BFGS the negative log-likelihood (same minimum);
* ``"gaussian"``: chi^2 with variance m + readout^2, the variance held fixed for each
  scipy solve and updated from its answer until the parameters stop moving (with a
  detector response: gain^2 (PSF^2 * counts) + readout^2);
* ``"l2"``: sum (m - o)^2.

Robustness:

* parameters are scaled (``x_scale="jac"``, or by the curvature for L-BFGS) and bounded
  (physical limits by default, e.g. N >= 1, angles in (0, 180));
* ``stages`` refines groups in turn (e.g. orientation and cell before N and mosaic), then
  everything together;
* starts outside the convergence basin of sharp spots: ``blur`` gives a coarse-to-fine
  schedule -- both model and observed image are smoothed with Gaussians of the given
  widths (pixels), largest first, which widens the basin (a spot 2 pixels off still
  overlaps its blurred model); each level starts from the previous one's answer and the
  last level (width 0) is the unsmoothed fit.

Uncertainties are the square roots of the diagonal of (J^T W J)^-1 at the solution, with
W = 1/m (Poisson) or 1/(m + readout^2) (Gaussian); J is dI/dtheta over the fitted pixels.
For l2, which assumes nothing about the noise, the sandwich estimate
(J^T J)^-1 J^T diag(r^2) J (J^T J)^-1 with the residuals r.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from .engine import build_model, check_backend, render, tangent_image
from .errors import NbraggError, ParameterError
from .gradients import check_gradients as _check_gradients
from .gradients import detected_jacobian, raw_gradient
from .response import convolve_psf, expected_counts, expected_signal, poisson_variance, response_derivatives, signal_vjp
from .params import RESPONSE_PARAMS, base_name, check_names, get_params, input_tangent, set_params

LOSSES = ("poisson", "gaussian", "l2")
METHODS = ("least_squares", "lbfgs")

# limits where a value is an answer, not a stop: a fit that ends there (no mosaic spread,
# one unit cell, no water...) has not been held back by its bounds
PHYSICAL_LIMITS = {"Na": (1.0, np.inf), "Nb": (1.0, np.inf), "Nc": (1.0, np.inf), "Ncells": (1.0, np.inf),
                   "fluence": (0.0, np.inf),
                   "mosaic_spread": (0.0, np.inf), "eta_a": (0.0, np.inf), "eta_b": (0.0, np.inf),
                   "eta_c": (0.0, np.inf), "osc": (0.0, np.inf), "polar": (-1.0, 1.0),
                   "water": (0.0, np.inf), "background_scale": (0.0, np.inf),
                   "background_thickness": (0.0, np.inf), "response_scale": (0.0, np.inf)}
# default bounds (user units) around the starting value v: physical limits, and no more
# than a refinement from a sensible start can mean (a cell edge does not halve); a bound
# given by the user replaces these
DEFAULT_BOUNDS = {
    **{n: (lambda v, n=n: PHYSICAL_LIMITS[n]) for n in ("fluence", "osc", "polar", "water", "background_scale",
                                                        "background_thickness", "response_scale")},
    # must stay above 0 (a PSF needs a width, the gain divides)
    **{n: lambda v: (0.1 * v, 10.0 * v) for n in ("psf_fwhm", "gain")},
    **{n: lambda v: (0.8 * v, 1.25 * v) for n in ("cell_a", "cell_b", "cell_c")},
    **{n: lambda v: (max(1.0, v - 10.0), min(179.0, v + 10.0)) for n in ("cell_alpha", "cell_beta", "cell_gamma")},
    **{n: lambda v: (min(1.0, v), max(10.0 * v, v + 10.0)) for n in ("Na", "Nb", "Nc", "Ncells")},
    "wavelength": lambda v: (0.9 * v, 1.1 * v),
    "distance": lambda v: (0.5 * v, 2.0 * v),
    "mosaic_spread": lambda v: (0.0, max(10.0 * v, 5.0)),
    **{n: lambda v: (0.0, max(10.0 * v, 5.0)) for n in ("eta_a", "eta_b", "eta_c")},
    # a stretch of the spectrum, and a shift of a few bandwidths at most
    "spectrum_scale": lambda v: (0.1 * v, 10.0 * v),
}


class RefinementError(NbraggError):
    """A refinement cannot start (bad observed image, parameters, gradient check...)."""


@dataclass
class Fit:
    """The result of :func:`refine`."""

    experiment: object
    values: Dict[str, float]
    uncertainties: Dict[str, float]
    success: bool
    message: str
    nfev: int
    njev: int
    history: List[float]
    names: List[str]
    loss: str
    method: str
    covariance: Optional[np.ndarray] = None
    start: Dict[str, float] = field(default_factory=dict)
    wall_time: float = 0.0
    final_loss: float = float("nan")
    at_bounds: Dict[str, str] = field(default_factory=dict)   # name -> "lower" or "upper"
    bounds: Dict[str, tuple] = field(default_factory=dict)    # name -> (lower, upper) used

    def table(self):
        """Parameter table: start, refined value, uncertainty, shift in uncertainties."""
        lines = ["%-16s %16s %16s %14s %9s" % ("parameter", "start", "refined", "uncertainty", "shift/sd")]
        for n in self.names:
            s = self.start.get(n, float("nan"))
            v = self.values[n]
            u = self.uncertainties.get(n, float("nan"))
            z = (v - s) / u if u and u > 0 and math.isfinite(u) else float("nan")
            lines.append("%-16s %16.8g %16.8g %14.4g %9.2f" % (n, s, v, u, z))
        lines.append(f"{self.method}, {self.loss} loss {self.final_loss:.8g}: {self.message} "
                     f"(nfev {self.nfev}, njev {self.njev}, {self.wall_time:.2f} s)")
        return "\n".join(lines)

    def __str__(self):
        return self.table()


# ----------------------------------------------------------------------------- losses

def _dev_term(m, o):
    """Per-pixel Poisson deviance 2(m - o - o log(m/o)) >= 0, stable near m = o."""
    with np.errstate(divide="ignore", invalid="ignore"):
        u = np.where(o > 0, (m - o) / np.where(o > 0, o, 1.0), 0.0)
        small = np.abs(u) < 1e-4
        # u - log1p(u) without cancellation for small u
        series = u * u * (0.5 - u / 3.0 + u * u / 4.0)
        # away from m = o: o log(o/m) - (o - m) from the logs themselves (log1p(u) would
        # round to log(0) for a model many orders below the count)
        far = u + np.where(o > 0, np.log(np.where(o > 0, o, 1.0)) - np.log(np.maximum(m, 1e-300)), 0.0)
        D = np.where(o > 0, 2.0 * o * np.where(small, series, far), 2.0 * m)
    return np.maximum(D, 0.0)


class _Objective:
    """Residuals, Jacobians and gradients of one loss over the selected pixels.

    The model m and the observation o are photons, or with a detector response (``gain``
    and ``adc`` set) the signal in ADU; then the Poisson loss is that of the shifted
    counts (x - adc) / gain + (readout / gain)^2 (read-out noise as extra Poisson counts
    of the same variance).  The Gaussian loss divides by a variance held fixed while the
    optimiser runs (:meth:`fix_variance`; the refinement updates it from the model and
    runs again until the parameters stop moving): a variance that moved with the
    parameters inside the objective would pull them toward a larger variance."""

    def __init__(self, loss, obs, readout=0.0):
        self.loss = loss
        self.obs = obs
        self.readout = float(readout)
        self.detected = False
        self.gain = 1.0
        self.adc = 0.0
        self.var = None

    def fix_variance(self, var):
        self.var = np.asarray(var, dtype=np.float64)

    def use_response(self, response):
        """Model and observation in ADU from now on, with this response's gain, offset and
        read-out noise."""
        self.detected = True
        self.gain = float(response.gain)
        self.adc = float(response.adc)
        self.readout = float(response.readout)

    def _shifted(self, x):
        if not self.detected:
            return x
        return (x - self.adc) / self.gain + (self.readout / self.gain) ** 2

    def poisson_mean(self, m):
        """The Poisson loss's model counts (m itself for photons)."""
        return self._shifted(m)

    def residuals(self, m):
        o = self.obs
        if self.loss == "l2":
            return m - o
        if self.loss == "gaussian":
            return (m - o) / np.sqrt(self.var)
        ms, os_ = self._shifted(m), self._shifted(o)
        D = _dev_term(np.maximum(ms, 1e-300), os_)
        return np.sign(ms - os_) * np.sqrt(D)

    def dres_dm(self, m, r):
        """d(residual)/d(model), per pixel."""
        o = self.obs
        if self.loss == "l2":
            return np.ones_like(m)
        if self.loss == "gaussian":
            return 1.0 / np.sqrt(self.var)
        mm = np.maximum(self._shifted(m), 1e-300)
        with np.errstate(divide="ignore", invalid="ignore"):
            d = (1.0 - self._shifted(o) / mm) / r
        # at r = 0 (m = o) the limit is 1/sqrt(m)
        near = np.abs(r) < 1e-8 * np.sqrt(mm) + 1e-300
        return np.where(near, 1.0 / np.sqrt(mm), d) / self.gain


    def value(self, m):
        """The objective minimised by both methods, up to a constant: sum r^2 (LS) ==
        2 (NLL - const) for Poisson."""
        r = self.residuals(m)
        return float(np.dot(r, r))

    def dvalue_dm(self, m):
        r = self.residuals(m)
        return 2.0 * r * self.dres_dm(m, r)

    def weights(self, m, nparams):
        """W for the covariance (J^T W J)^-1 (Poisson and Gaussian losses)."""
        if self.loss == "poisson":
            return 1.0 / np.maximum(self._shifted(m) * self.gain ** 2, 1e-300)
        return 1.0 / self.var


# ----------------------------------------------------------------------------- problem

def _blur(img, sigma):
    if sigma <= 0:
        return img
    from scipy.ndimage import gaussian_filter
    # within each panel: (panels, slow, fast) images are not blurred across panels
    return gaussian_filter(img, (0,) * (img.ndim - 2) + (sigma, sigma), mode="nearest")


class _Problem:
    def __init__(self, exp, observed, names, loss, select, threads, readout, sigma, backend="cpu", detected=False):
        self.exp0 = exp
        self.detected = detected
        self.names = names
        self.threads = threads
        self.backend = backend
        self.sigma = sigma
        self.select = select
        self.shape = observed.shape
        self.obj = _Objective(loss, _blur(observed, sigma)[select], readout)
        self.start = get_params(exp, names)
        self.nfev = 0
        self.njev = 0
        self.history = []
        self._cache = None

    def experiment(self, theta):
        return set_params(self.exp0, dict(zip(self.names, (float(t) for t in theta))))

    def _evaluate(self, theta, with_jacobian=False):
        """(model, m, Jm) at theta: the model image over the selected pixels (blurred like
        the observation) and, when asked, dm/dtheta there (else None), cached for the last
        theta.  A Jacobian pass yields the image too; on the CPU it is the forward
        kernel's image bit for bit, so the objective at a theta does not depend on whether
        ``fun`` or ``jac`` came first, and a Jacobian-first point needs no forward pass (on
        the GPU the forward image is rendered).  The uncertainties reuse the last Jacobian."""
        key = tuple(float(t) for t in theta)
        if self._cache is None or self._cache[0] != key:
            # [theta, model, m, Jm, photons (the unblurred image, with a response)]
            self._cache = [key, build_model(self.experiment(theta), warn=lambda m: None), None, None, None]
        entry = self._cache
        model = entry[1]
        response = model.experiment.response if self.detected else None
        if response is not None:
            self.obj.use_response(response)
        pixel = model.experiment.detector.pixel_size
        if with_jacobian and entry[3] is None:
            d = np.array([input_tangent(model, n) for n in self.names]).reshape(len(self.names), -1)
            J, image = tangent_image(model, d, threads=self.threads, backend=self.backend)
            if self.backend != "cpu":
                image = None
            elif response is not None:
                entry[4] = image
            if response is not None:
                photons = image if image is not None else self._photons(entry)
                J, _ = detected_jacobian(J, photons, self.names, response, pixel)
            if self.sigma > 0:
                J = np.stack([_blur(J[..., p], self.sigma) for p in range(J.shape[-1])], axis=-1)
            entry[3] = J[self.select]
            if entry[2] is None and image is not None:
                entry[2] = self._signal(image, response, pixel)
        if entry[2] is None:
            entry[2] = self._signal(self._photons(entry), response, pixel)
        return model, entry[2], entry[3]

    def _photons(self, entry):
        if entry[4] is None:
            entry[4], _ = render(entry[1], threads=self.threads, backend=self.backend)
        return entry[4]

    def _signal(self, image, response, pixel):
        if response is not None:
            image = expected_signal(image, response, pixel)
        return _blur(image, self.sigma)[self.select]

    def _model(self, theta):
        model, m, _ = self._evaluate(theta)
        return model, m

    def fun(self, theta):
        self.nfev += 1
        try:
            _, m = self._model(theta)
        except ParameterError:
            # a trial step to values that make no experiment (a domain matrix that is not
            # positive definite, a wavelength below 0...): infinite residuals, which the
            # trust region rejects and shrinks from
            return np.full(self.obj.obs.shape, np.inf)
        r = self.obj.residuals(m)
        self.history.append(float(np.dot(r, r)))
        return r

    def model_jacobian(self, theta):
        """dm/dtheta over the selected pixels (blurred like the images)."""
        return self._evaluate(theta, with_jacobian=True)[2]

    def variance(self, theta):
        """The Gaussian loss's variance per selected pixel at theta: photons, m + readout^2;
        pixel values, gain^2 (PSF^2 * counts) + readout^2 (the counts are Poisson before
        the PSF spreads them).  At least one photon's worth."""
        model, m, _ = self._evaluate(theta)
        if not self.detected:
            return np.maximum(np.maximum(m, 0.0) + self.obj.readout ** 2, 1.0)
        response = model.experiment.response
        counts = poisson_variance(self._photons(self._cache), response, model.experiment.detector.pixel_size)
        v = response.gain ** 2 * np.maximum(counts[self.select], 0.0) + response.readout ** 2
        return np.maximum(v, response.gain ** 2)

    def psf_correlated_information(self, theta, WJ):
        """(WJ)^T C (WJ) for the pixels' true covariance C = gain^2 K diag(counts) K +
        readout^2 I: the PSF K spreads each pixel's Poisson counts over its neighbours,
        so their noise is correlated.  The covariance of the estimate is then the sandwich
        (J^T W J)^-1 (WJ)^T C (WJ) (J^T W J)^-1 (with W = 1/C's diagonal it would
        otherwise count the correlated pixels as independent)."""
        model, _, _ = self._evaluate(theta)
        response = model.experiment.response
        pixel = model.experiment.detector.pixel_size
        photons = self._photons(self._cache)
        counts = expected_counts(photons, response)
        CWJ = np.empty_like(WJ)
        for p in range(WJ.shape[1]):
            v = np.zeros(self.shape)
            v[self.select] = WJ[:, p]
            spread = convolve_psf(response, counts * convolve_psf(response, v, pixel), pixel)
            CWJ[:, p] = response.gain ** 2 * spread[self.select] + response.readout ** 2 * WJ[:, p]
        return WJ.T @ CWJ

    def jac(self, theta):
        self.njev += 1
        _, m, Jm = self._evaluate(theta, with_jacobian=True)
        r = self.obj.residuals(m)
        return self.obj.dres_dm(m, r)[:, None] * Jm

    def value_and_grad(self, theta):
        self.nfev += 1
        self.njev += 1
        model, m = self._model(theta)
        val = self.obj.value(m)
        self.history.append(val)
        g = np.zeros(self.shape)
        g[self.select] = self.obj.dvalue_dm(m)
        if self.sigma > 0:
            g = _blur(g, self.sigma)   # the Gaussian filter is symmetric: its adjoint is itself
        own = {}
        if self.detected:
            response = model.experiment.response
            pixel = model.experiment.detector.pixel_size
            names = [n for n in self.names if n in RESPONSE_PARAMS]
            if names:
                photons = self._photons(self._cache)
                own = {n: float(np.sum(g * dE)) for n, dE in response_derivatives(photons, response, pixel,
                                                                                   names).items()}
            g = signal_vjp(g, response, pixel)
        raw = raw_gradient(model, g, threads=self.threads, backend=self.backend, want_F=False)
        return val, np.array([own[n] if n in own else raw.contract(input_tangent(model, n)) for n in self.names])


# ----------------------------------------------------------------------------- refine

def _bounds(names, bounds, start):
    """(lower, upper) arrays for ``names``: the user's bounds, or the defaults around the
    starting values; a start outside them is an error."""
    bounds = bounds or {}
    for n in bounds:
        if n not in names:
            raise ParameterError(f"bounds[{n!r}]: {n!r} is not among the refined parameters {names}")
    lo, hi = [], []
    for n in names:
        b = bounds[n] if n in bounds else DEFAULT_BOUNDS.get(base_name(n), lambda v: (-np.inf, np.inf))(start[n])
        try:
            a, c = float(b[0]), float(b[1])
        except (TypeError, ValueError, IndexError):
            raise ParameterError(f"bounds[{n!r}] = {b!r}: expected (lower, upper)") from None
        if not a < c:
            raise ParameterError(f"bounds[{n!r}] = {b!r}: lower must be below upper")
        if not a <= start[n] <= c:
            raise ParameterError(f"{n} starts at {start[n]:g}, outside its bounds ({a:g}, {c:g})")
        lo.append(a)
        hi.append(c)
    return np.array(lo), np.array(hi)


def _at_bounds(names, x, lo, hi):
    """{name: "lower"|"upper"} for the values that ended on a bound (within 1e-6 of the
    bounded range, or of the value where the range is infinite), physical limits aside."""
    out = {}
    for n, v, a, c in zip(names, x, lo, hi):
        width = (c - a) if np.isfinite(c - a) else max(abs(v), 1.0)
        plo, phi = PHYSICAL_LIMITS.get(base_name(n), (np.nan, np.nan))
        if np.isfinite(a) and a != plo and v - a <= 1e-6 * width:
            out[n] = "lower"
        elif np.isfinite(c) and c != phi and c - v <= 1e-6 * width:
            out[n] = "upper"
    return out


def _rendered(d):
    """The pixels the kernels compute: inside the ROI and the mask; (slow, fast), or
    (panels, slow, fast) for a detector of several panels."""
    if d.panels is not None:
        planes = [_in_roi_and_mask((d.spixels, d.fpixels), p.pixel_mask(), p.roi) for p in d.panels]
        return planes[0] if len(planes) == 1 else np.stack(planes)
    return _in_roi_and_mask((d.spixels, d.fpixels), d.mask, d.roi)


def _in_roi_and_mask(shape, mask, roi):
    sel = np.ones(shape, dtype=bool)
    if mask is not None:
        sel &= np.asarray(mask) != 0
    if roi is not None:
        xmin, xmax, ymin, ymax = roi
        inside = np.zeros(shape, dtype=bool)
        inside[max(ymin, 0):ymax + 1, max(xmin, 0):xmax + 1] = True
        sel &= inside
    return sel


def _trusted(d, obs):
    """Pixel values inside each panel's trusted range (dxtbx's, inclusive)."""
    keep = np.ones(obs.shape, dtype=bool)
    if d.panels is None:
        return keep
    planes = obs if obs.ndim == 3 else obs[None]
    kept = keep if obs.ndim == 3 else keep[None]
    for k, p in enumerate(d.panels):
        if p.trusted_range is not None:
            lo, hi = p.trusted_range
            kept[k] &= (planes[k] >= lo) & (planes[k] <= hi)
    return keep


def _detected_selection(exp, obs, sel):
    """Against pixel values: leave out pixels at the ends of the range (saturated, or
    clipped at 0: the model is not clipped) and, with a PSF, those within its reach of a
    pixel the kernels do not compute (outside the ROI or masked: its light, which would
    spread into them, is missing from the model)."""
    from .response import psf_radius
    response = exp.response
    keep = sel & (obs < 2.0 ** response.bits - 1) & (obs > 0) & _trusted(exp.detector, obs)
    if response.psf is not None and response.psf_fwhm > 0:
        shape = obs.shape
        fwhm = response.psf_fwhm * 1e-3 / exp.detector.pixel_size
        r = psf_radius(response.psf, fwhm, shape[-2:], response.psf_radius)
        missing = ~_rendered(exp.detector)
        if missing.any():
            from scipy.ndimage import binary_dilation
            reach = np.ones((2 * r + 1, 2 * r + 1), dtype=bool)     # within a panel, not across panels
            keep &= ~binary_dilation(missing, structure=reach if missing.ndim == 2 else reach[None])
    if not keep.any():
        raise RefinementError("no pixels to fit: against pixel values, saturated pixels, pixels at 0 and pixels "
                              "within the PSF's reach of the ROI's edge or of masked pixels are left out, and "
                              "that leaves none")
    return keep


def _selection(exp, observed, mask):
    d = exp.detector
    shape = (d.spixels, d.fpixels)
    if d.panels is not None and len(d.panels) > 1:
        shape = (len(d.panels),) + shape
    obs = np.asarray(observed, dtype=np.float64)
    if obs.shape != shape:
        raise RefinementError(f"observed image has shape {obs.shape}; the experiment's detector is "
                              f"{'(panels, spixels, fpixels)' if len(shape) == 3 else '(spixels, fpixels)'} = {shape}")
    sel = _rendered(d)
    if mask is not None:
        mk = np.asarray(mask)
        if mk.shape != shape:
            raise RefinementError(f"mask has shape {mk.shape}; expected {shape}")
        sel &= mk.astype(bool)
    sel &= np.isfinite(obs)
    if not sel.any():
        raise RefinementError("no pixels to fit (mask, ROI and the observed image leave none)")
    if np.any(obs[sel] < 0):
        raise RefinementError("the observed image has negative values (subtract the right ADC offset?)")
    return obs, sel


def _fit_once(exp, obs, sel, names, loss, method, bnds, compute, readout, sigma, options):
    threads, backend, detected = compute
    prob = _Problem(exp, obs, names, loss, sel, threads, readout, sigma, backend, detected)
    # pixels with a zero model (cut by -dmin, outside the crystal's reach) carry no
    # information for Poisson; drop them from this level's selection
    _, m0 = prob._model(np.array([prob.start[n] for n in names]))
    counts0 = prob.obj.poisson_mean(m0)
    if loss == "poisson" and np.any(counts0 <= 0):
        keep = np.zeros(prob.shape, dtype=bool)
        keep[sel] = counts0 > 0
        prob = _Problem(exp, obs, names, loss, keep, threads, readout, sigma, backend, detected)
    x0 = np.array([prob.start[n] for n in names])
    lo, hi = bnds
    # inside the bounds already (refine checks the start); a value read back after a stage
    # may sit an ulp outside (beam_x through ORGX), which scipy would refuse
    x0 = np.clip(x0, lo, hi)
    if loss != "gaussian":
        x, success, message = _solve(prob, x0, lo, hi, method, options)
        return prob, x, success, message
    # the variance held fixed for each solve, from the model where it starts; again from
    # the answer until the parameters stop moving
    x = x0
    for k in range(VARIANCE_UPDATES):
        prob.obj.fix_variance(prob.variance(x))
        x_new, success, message = _solve(prob, x, lo, hi, method, options)
        moved = np.abs(x_new - x) > 1e-7 * np.maximum(np.abs(x_new), 1e-300)
        x = x_new
        if not moved.any():
            if k > 0 and not success:
                # a solve from an answer that the new variance leaves in place: L-BFGS-B
                # may call a line search that finds nothing to gain abnormal
                success, message = True, f"the parameters stopped moving ({message})"
            break
    prob.obj.fix_variance(prob.variance(x))
    return prob, x, success, message


VARIANCE_UPDATES = 8


def _solve(prob, x0, lo, hi, method, options):
    """One scipy solve from x0 within (lo, hi): (x, success, message)."""
    names = prob.names
    from scipy import optimize
    if method == "least_squares":
        opts = dict(x_scale="jac", max_nfev=200, xtol=1e-10, ftol=1e-10, gtol=1e-10)
        opts.update(options)
        res = optimize.least_squares(prob.fun, x0, jac=prob.jac, bounds=(lo, hi), method="trf", **opts)
        x, success, message = res.x, bool(res.success), str(res.message)
    else:
        # scale by the Gauss-Newton curvature at the start: unit curvature per parameter
        Jr = prob.jac(x0)
        prob.njev -= 1
        curv = np.sqrt(np.maximum((Jr * Jr).sum(axis=0), 1e-300))
        scale = 1.0 / curv
        val0 = max(prob.obj.value(prob._model(x0)[1]), 1e-300)

        def f(z):
            v, g = prob.value_and_grad(x0 + z * scale)
            return v / val0, g * scale / val0

        zlo = np.where(np.isfinite(lo), (lo - x0) / scale, -np.inf)
        zhi = np.where(np.isfinite(hi), (hi - x0) / scale, np.inf)
        opts = dict(maxiter=500, ftol=1e-15, gtol=1e-10, maxcor=20)
        opts.update(options)
        res = optimize.minimize(f, np.zeros(len(names)), jac=True, method="L-BFGS-B",
                                bounds=list(zip(zlo, zhi)), options=opts)
        x, success, message = x0 + res.x * scale, bool(res.success), str(res.message)
    return x, success, message


def refine(exp, observed, params, loss="poisson", method="least_squares", mask=None, bounds=None, *,
           stages=None, blur=None, readout=0.0, check_gradients=False, gradient_tolerance=1e-4,
           threads=None, backend="cpu", detected=None, **options):
    """Refine named parameters of ``exp`` against ``observed`` (photons, image shape; or
    pixel values in ADU when the experiment has a detector response).

    Parameters
    ----------
    exp : Experiment (the starting model)
    observed : array (spixels, fpixels) of photons, or of ADU with ``detected``
    detected : fit the detector's expected signal E = adc + gain * PSF * (scale *
        calibration * photons) to pixel values (default: when ``exp.response`` is set).
        The response's psf_fwhm, gain, response_scale and adc may then be refined; the
        Gaussian loss's variance is gain (E - adc) + readout^2 (Response.readout), and the
        Poisson loss is that of the shifted counts (x - adc) / gain + (readout / gain)^2
        (which needs gain and adc fixed).
    params : names of scalar parameters to refine (see :mod:`nbragg.params`)
    loss : "poisson", "gaussian" (variance model + readout^2) or "l2"
    method : "least_squares" (analytic Jacobian) or "lbfgs" (adjoint gradient)
    mask : optional boolean image, True where pixels are fitted (combined with the
        detector's ROI and mask)
    bounds : {name: (lower, upper)} in user units.  The defaults are physical limits and a
        range around the start (cell edges 0.8-1.25 times, angles 10 degrees, N up to
        10 times, wavelength 10 %, distance 0.5-2 times, mosaic spread up to 10 times or
        5 degrees); a start outside the bounds is an error.  A parameter that ends on a
        bound is named in ``Fit.at_bounds`` and makes ``Fit.success`` False.
    stages : optional list of lists of names refined in turn before a final joint fit
    blur : optional list of Gaussian widths in pixels, largest first, for a
        coarse-to-fine schedule (a final unblurred fit is always run)
    check_gradients : compare analytic and finite-difference derivatives at the start
        and raise RefinementError if any relative error exceeds ``gradient_tolerance``
    threads, backend : CPU threads, or backend="cuda" to compute images and derivatives
        on a GPU
    options : passed to scipy (e.g. max_nfev for least_squares, maxiter for lbfgs)

    Returns
    -------
    Fit
    """
    check_backend(backend)
    if loss not in LOSSES:
        raise ParameterError(f"loss = {loss!r}; choose one of {', '.join(LOSSES)}")
    if method not in METHODS:
        raise ParameterError(f"method = {method!r}; choose one of {', '.join(METHODS)}")
    names = check_names(params, allow_arrays=False)
    if not names:
        raise ParameterError("no parameters to refine")
    if detected is None:
        detected = exp.response is not None
    if detected:
        if exp.response is None:
            raise ParameterError("detected=True needs a detector response (Experiment.response is None)")
        if readout:
            raise ParameterError(f"readout = {readout:g}: with a detector response the read-out noise is "
                                 f"Experiment.response.readout (ADU)")
        if loss == "poisson" and {"gain", "adc"} & set(names):
            raise ParameterError("loss='poisson' with a detector response keeps gain and adc fixed (the observed "
                                 "pixels are turned into counts with them); refine them with loss='gaussian'")
    else:
        own = [n for n in names if n in RESPONSE_PARAMS]
        if own:
            raise ParameterError(f"parameter {own[0]!r} belongs to the detector response: refine against pixel "
                                 f"values with a response (Experiment.response, detected=True)")
    obs, sel = _selection(exp, observed, mask)
    if detected:
        sel = _detected_selection(exp, obs, sel)
    if stages is not None:
        for st in stages:
            for n in check_names(st, allow_arrays=False):
                if n not in names:
                    raise ParameterError(f"stage parameter {n!r} is not among the refined parameters {names}")
    t0 = time.perf_counter()
    if check_gradients:
        chk = _check_gradients(exp, names, seed=0, threads=threads, backend=backend, detected=detected)
        bad = [r for r in chk.rows if r[3] > gradient_tolerance and abs(r[1]) > 0]
        if bad:
            raise RefinementError("analytic and finite-difference derivatives disagree:\n" + chk.table())
    levels = [float(s) for s in (blur or [])]
    if not levels or levels[-1] != 0.0:
        levels.append(0.0)
    groups = [list(s) for s in (stages or [])] + [names]
    start = get_params(exp, names)
    lo_all, hi_all = _bounds(names, bounds, start)
    current = exp
    history, nfev, njev = [], 0, 0
    prob = x = None
    success, message = False, ""
    for sigma in levels:
        for group in groups:
            at = [names.index(n) for n in group]
            bnds = (lo_all[at], hi_all[at])
            prob, x, success, message = _fit_once(current, obs, sel, group, loss, method, bnds,
                                                  (threads, backend, detected), readout, sigma, options)
            current = prob.experiment(x)
            history.extend(prob.history)
            nfev += prob.nfev
            njev += prob.njev
    # uncertainties from the last (unblurred, joint) level
    Jm = prob.model_jacobian(x)
    _, m = prob._model(x)
    try:
        if loss == "l2":
            # unweighted least squares says nothing about the noise: the sandwich
            # (heteroscedasticity-consistent) estimate with the residuals as variances
            r = m - prob.obj.obs
            A = np.linalg.inv(Jm.T @ Jm)
            cov = A @ (Jm.T @ ((r * r)[:, None] * Jm)) @ A
        else:
            W = prob.obj.weights(m, len(names))
            cov = np.linalg.inv(Jm.T @ (W[:, None] * Jm))
            if detected and current.response.psf is not None:
                cov = cov @ prob.psf_correlated_information(x, W[:, None] * Jm) @ cov
        sd = np.sqrt(np.maximum(np.diag(cov), 0.0))
    except np.linalg.LinAlgError:
        cov = None
        sd = np.full(len(names), np.nan)
    values = get_params(current, names)
    at = _at_bounds(names, [values[n] for n in names], lo_all, hi_all)
    if at:
        success = False
        message = (f"{message}; ended on a bound: "
                   + ", ".join(f"{n} at its {side} bound {values[n]:g}" for n, side in at.items())
                   + " (the minimum may lie beyond it: check the start, or widen the bounds)")
    return Fit(experiment=current, values=values, uncertainties=dict(zip(names, (float(s) for s in sd))),
               success=success, message=message, nfev=nfev, njev=njev, history=history, names=names, loss=loss,
               method=method, covariance=cov, start=start, wall_time=time.perf_counter() - t0,
               final_loss=prob.obj.value(m), at_bounds=at,
               bounds={n: (float(a), float(c)) for n, a, c in zip(names, lo_all, hi_all)})


from ._callable import make_callable  # noqa: E402  (after refine exists)

make_callable(__name__, "refine")
