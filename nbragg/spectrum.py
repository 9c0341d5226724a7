"""Incident spectra for :class:`nbragg.Beam` (``spectrum=(wavelengths_A, weights)``)."""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erf

from .errors import ParameterError
from .units import HC_EV_ANGSTROM

_FWHM_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
DEFAULT_CHANNELS = 101


def sase_spectrum(wavelength=None, energy=None, bandwidth=2e-3, spikes=20, channels=DEFAULT_CHANNELS, seed=0, span=3.0):
    """A SASE-like XFEL spectrum: ``spikes`` Gaussian modes under a Gaussian envelope.

    Self-amplified spontaneous emission starts from noise, so each pulse is a different
    set of longitudinal modes: their centres are drawn from the envelope, their
    intensities from an exponential distribution (a mode's intensity statistics), and
    each mode is as wide as the envelope divided by the number of modes.  Each channel
    holds the modes' intensity integrated over its width.

    Parameters
    ----------
    wavelength : mean wavelength (Angstrom); or ``energy`` (eV)
    bandwidth : relative FWHM of the envelope (delta lambda / lambda; 2e-3 is typical)
    spikes : number of modes (>= 1)
    channels : number of wavelength channels (>= 1), evenly spaced over ``span`` times
        the envelope's FWHM about the mean
    seed : the pulse (the same seed gives the same spectrum)

    Returns
    -------
    (wavelengths_A, weights) : two arrays of ``channels`` values, weights summing to 1,
    for ``nbragg.Beam(spectrum=...)``.
    """
    if (wavelength is None) == (energy is None):
        raise ParameterError("sase_spectrum: give one of wavelength (Angstrom) or energy (eV)")
    if wavelength is None:
        _positive("energy", energy)
        wavelength = HC_EV_ANGSTROM / float(energy)
    _positive("wavelength", wavelength)
    _positive("bandwidth", bandwidth)
    _positive("span", span)
    spikes = _count("spikes", spikes)
    channels = _count("channels", channels)
    mean = float(wavelength)
    fwhm = float(bandwidth) * mean
    rng = np.random.default_rng(seed)
    centres = rng.normal(mean, fwhm / _FWHM_SIGMA, spikes)
    heights = rng.exponential(1.0, spikes)
    width = fwhm / spikes / _FWHM_SIGMA
    if channels == 1:
        return np.array([mean]), np.ones(1)
    lam = mean + fwhm * float(span) * np.linspace(-0.5, 0.5, channels)
    # each channel takes the modes' intensity over its bin (between the midpoints), so a
    # mode narrower than a channel keeps its weight wherever it falls
    step = lam[1] - lam[0]
    edges = np.concatenate([[lam[0] - step / 2], (lam[1:] + lam[:-1]) / 2, [lam[-1] + step / 2]])
    cdf = 0.5 * (1.0 + erf((edges[None, :] - centres[:, None]) / (width * math.sqrt(2.0))))
    w = np.sum(heights[:, None] * np.diff(cdf, axis=1), axis=0)
    if not np.sum(w) > 0:            # every mode outside the channels: the envelope
        w = np.exp(-0.5 * ((lam - mean) / (fwhm / _FWHM_SIGMA)) ** 2)
    return lam, w / np.sum(w)


def _positive(name, v):
    try:
        ok = math.isfinite(float(v)) and float(v) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ParameterError(f"sase_spectrum: {name} = {v!r} must be a positive number")


def _count(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ParameterError(f"sase_spectrum: {name} = {v!r} must be a whole number >= 1")
    return int(v)
