"""Beam: wavelength, fluence, and the list of point sources (divergence x dispersion).

Each source is a unit vector pointing from the sample *to* the source, plus a
wavelength in metres; the incident direction is its negative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import ParameterError
from .crystal import MAX_STEPS
from .geometry import cross, re, rotate_axis, unitize


def resolve_steps(rng, step, steps, unset_range_default=1.0):
    """nanoBragg.c's rules for a (range, step, steps) triple; -1 / negative = unset.

    Used for divergence and dispersion.  Returns (range, step, steps).
    """
    if steps <= 0:
        if rng < 0.0:
            if step <= 0.0:
                steps, rng, step = 1, 0.0, 0.0
            else:
                rng, steps = step, 2
        else:
            if step <= 0.0:
                step, steps = rng, 2
            else:
                steps = math.ceil(rng / step)
    else:
        if rng < 0.0:
            if step <= 0.0:
                rng = unset_range_default
                step = rng / steps
            else:
                rng, steps = step, 2
        else:
            if step <= 0.0:
                if steps <= 1:
                    steps = 2
                step = rng / (steps - 1)
    if rng <= 0.0 or step <= 0.0 or steps <= 0:
        steps, rng, step = 1, 0.0, 0.0
    return rng, step, steps


def _raw(value, divisor=1.0):
    return -1.0 if value is None else value / divisor


def _weights(beam, listing, channels, honour=False):
    """Each source's weight in the sum: 1 (nanoBragg.c), or with ``Beam.source_weights``
    the source file's weight column (nonBragg.c), 1 for the points of a divergence grid;
    with ``honour`` (the physical mode) the column normalised to mean 1;
    with a spectrum, its channel's normalised weight times the number of channels (the
    image is divided by the number of sources, so it is the weighted mean over channels)."""
    if beam.spectrum is not None:
        return _mean_one(np.asarray(beam.spectrum[1]))[channels]
    if not (beam.source_weights or honour) or beam.sources is None:
        return np.ones(len(listing))
    w = np.array([w for (_, _, _, w, _) in listing])
    if not honour:
        return w
    # the physical mode: the fluence shared among the sources by weight, as a spectrum's
    bad = np.flatnonzero(~(w >= 0))
    if bad.size:
        raise ParameterError(f"source {bad[0] + 1}: weight {w[bad[0]]:g} is negative (Beam.sources, -sourcefile)")
    if not np.sum(w) > 0:
        raise ParameterError("every source's weight is 0 (Beam.sources, -sourcefile)")
    return _mean_one(w)


def _mean_one(w):
    """Weights scaled to mean 1: they share the fluence (the image is divided by their count)."""
    return len(w) * w / np.sum(w)


def spectrum_weight_jacobian(beam, sources):
    """(d(source weights), d(source wavelengths)) / d(Beam.spectrum weights): two (n
    sources, n channels) arrays.  The wavelengths move with the weights through the
    weighted mean that Beam.spectrum_scale stretches about."""
    lam0 = np.asarray(beam.spectrum[0], dtype=float) / 1e10
    w = np.asarray(beam.spectrum[1], dtype=float)
    n, total = len(w), float(np.sum(w))
    rows = np.arange(len(sources.channels))
    Jw = np.zeros((len(rows), n))
    Jw[rows, sources.channels] = n / total
    Jw -= (n * w / total ** 2)[sources.channels][:, None]
    mean = np.sum(lam0 * w) / total
    dmean = (lam0 - mean) / total
    Jl = np.broadcast_to((1.0 - beam.spectrum_scale) * dmean, (len(rows), n)).copy()
    return Jw, Jl


def _shifted_and_scaled(beam, lam, weights):
    """Source wavelengths after Beam.spectrum_scale (about their weighted mean) and
    Beam.spectrum_shift; unchanged at the defaults (bit for bit)."""
    scale, shift = beam.spectrum_scale, beam.spectrum_shift
    if scale != 1.0:
        w = np.real(weights)
        mean = np.sum(lam * w) / np.sum(w) if np.sum(w) > 0 else np.mean(lam)
        lam = mean + scale * (lam - mean)
    if shift != 0.0:
        lam = lam + shift / 1e10
    bad = np.flatnonzero(~(np.real(lam) > 0))
    if bad.size:
        raise ParameterError(f"source {bad[0] + 1}: wavelength {np.real(lam[bad[0]]) * 1e10:g} A after "
                             f"Beam.spectrum_scale = {np.real(scale):g} and spectrum_shift = {np.real(shift):g} A "
                             f"is not positive")
    return lam


@dataclass
class Sources:
    """Resolved sources: unit vectors toward each source (n, 3), wavelengths (n,) in m."""

    directions: np.ndarray
    wavelengths: np.ndarray
    weights: np.ndarray         # each source's weight in the sum (all 1, as nanoBragg.c, unless
                                # Beam.source_weights)
    divsteps: int
    dispsteps: int
    hdiv: tuple
    vdiv: tuple
    disp: tuple
    from_file: bool
    listing: list = field(default_factory=list)       # (X, Y, Z, weight, lambda) as given
    channels: np.ndarray = None                       # each source's spectrum channel (0 without one)
    divergence_offsets: list = field(default_factory=list)
    lambdas: list = field(default_factory=list)


def resolve_sources(beam, beam_vector, polar_vector, honour_weights=False):
    """Build the source list from a :class:`~nbragg.experiment.Beam` and the beam axes
    (``honour_weights``: a source file's weights count, as with Beam.source_weights)."""
    lambda0 = beam.wavelength / 1e10
    source_distance = beam.source_distance / 1000.0
    hdiv = resolve_steps(_raw(beam.hdiv_range, 1000.0), _raw(beam.hdiv_step, 1000.0), beam.hdiv_steps or -1)
    vdiv = resolve_steps(_raw(beam.vdiv_range, 1000.0), _raw(beam.vdiv_step, 1000.0), beam.vdiv_steps or -1)
    disp = resolve_steps(_raw(beam.dispersion, 100.0), _raw(beam.disp_step, 100.0), beam.disp_steps or -1)
    hdivrange, hdivstep, hdivsteps = hdiv
    vdivrange, vdivstep, vdivsteps = vdiv
    dispersion, dispstep, dispsteps = disp
    for what, n in (("horizontal divergence (-hdivrange/-hdivstep/-hdivsteps, Beam.hdiv_*)", hdivsteps),
                    ("vertical divergence (-vdivrange/-vdivstep/-vdivsteps, Beam.vdiv_*)", vdivsteps),
                    ("dispersion (-dispersion/-dispstep/-dispsteps, Beam.dispersion/disp_*)", dispsteps)):
        if n > MAX_STEPS:
            raise ParameterError(f"{n:.3g} {what} steps is more than {MAX_STEPS}: check the step's unit")

    listing = []
    offsets = []
    lambdas = [lambda0 * (1.0 + dispstep * t - dispersion / 2.0) for t in range(dispsteps)]
    if beam.spectrum is not None:
        lambdas = [x / 1e10 for x in beam.spectrum[0]]
    channel_of = []
    if beam.sources is not None:
        raw = np.array(beam.sources, dtype=float)
        pos = []
        lam = []
        for i, (x, y, z, w, l) in enumerate(raw):
            if math.isnan(x):
                x = -source_distance * beam_vector[0]
            if math.isnan(y):
                y = -source_distance * beam_vector[1]
            if math.isnan(z):
                z = -source_distance * beam_vector[2]
            if math.isnan(w):
                w = 1.0
            if math.isnan(l):
                l = lambda0
            if not re(l) > 0:
                raise ParameterError(f"source {i + 1}: wavelength {l:g} m is not positive")
            listing.append((x, y, z, w, l))
            pos.append((x, y, z))
            lam.append(l)
        divsteps = -1
    else:
        vert = unitize(cross(beam_vector, polar_vector))[0]
        pos = []
        lam = []
        divsteps = 0
        with np.errstate(divide="ignore", invalid="ignore"):
            for ht in range(hdivsteps):
                for vt in range(vdivsteps):
                    h = hdivstep * ht - hdivrange / 2.0
                    v = vdivstep * vt - vdivrange / 2.0
                    # nanoBragg's ellipse test; 0/0 gives NaN, which never cuts
                    test = np.float64(h * h - hdivstep * hdivstep / 4.0 * (1 - hdivsteps % 2)) / np.float64(hdivrange) / np.float64(hdivrange)
                    test += np.float64(v * v - vdivstep * vdivstep / 4.0 * (1 - vdivsteps % 2)) / np.float64(vdivrange) / np.float64(vdivrange)
                    if beam.round_div and test * 4.0 > 1.1:
                        continue
                    divsteps += 1
                    offsets.append((h, v))
                    vec = -source_distance * np.asarray(beam_vector, dtype=float)
                    vec = rotate_axis(vec, polar_vector, v)
                    vec = rotate_axis(vec, vert, h)
                    for c, lam_t in enumerate(lambdas):
                        channel_of.append(c)
                        listing.append((vec[0], vec[1], vec[2], 0.0, lam_t))
                        pos.append(tuple(vec))
                        lam.append(lam_t)
        if not listing:
            # nanoBragg.c goes on with 0 sources, divides by 0 and writes an all-NaN image
            raise ParameterError(
                f"no source is left: the round-divergence cut (-round_div, Beam.round_div) removes every point "
                f"of the {hdivsteps}x{vdivsteps} divergence grid (horizontal {hdivrange * 1000:g} mrad in steps "
                f"of {hdivstep * 1000:g} mrad, vertical {vdivrange * 1000:g} mrad in steps of "
                f"{vdivstep * 1000:g} mrad), so there is nothing to simulate; use a square grid "
                f"(-square_div, Beam.round_div=False) or more divergence steps, for example 2 or more "
                f"(-hdivsteps/-vdivsteps, Beam.hdiv_steps/vdiv_steps), or a step smaller than the range")
        n = len(listing)
        listing = [(x, y, z, 1.0 / n, l) for (x, y, z, _, l) in listing]
    dirs = np.empty((len(pos), 3), dtype=np.result_type(np.asarray(pos), float))
    for i, p in enumerate(pos):
        u, mag = unitize(np.array(p))
        if mag == 0.0:
            raise ParameterError(f"source {i + 1} lies at the sample (X Y Z = 0 0 0): its direction is undefined")
        dirs[i] = u
    channels = np.array(channel_of if channel_of else [0] * len(listing), dtype=np.int64)
    weights = _weights(beam, listing, channels, honour_weights)
    wavelengths = _shifted_and_scaled(beam, np.array(lam), weights)
    return Sources(
        directions=dirs, wavelengths=wavelengths, weights=weights, divsteps=divsteps,
        dispsteps=len(lambdas) if beam.spectrum is not None else dispsteps, hdiv=hdiv, vdiv=vdiv, disp=disp,
        from_file=beam.sources is not None, listing=listing, divergence_offsets=offsets, lambdas=lambdas,
        channels=channels,
    )
