"""The one data path: Experiment -> model arrays -> kernel -> scaled image -> Result.

The command line, refinement and dataset generation all call :func:`simulate` (or
:func:`build_model` plus :func:`render`); none of them builds geometry itself.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
from numba import njit

from .errors import BackendError, ParameterError
from .experiment import Experiment
from .kernels import cpu as K
from .kernels.precision import cpu_single
from .models.beam import Sources, resolve_sources
from .models.crystal import CrystalModel, resolve_crystal
from .models.detector import DetectorGeometry, resolve_detector
from .models.structure import StructureModel, resolve_structure
from .units import AVOGADRO, R_E_SQR, WATER_F, WATER_MW

log = logging.getLogger("nbragg")

_SHAPE_CODES = {"square": 0, "round": 1, "gauss": 2, "tophat": 3}
_SHAPE_NAMES = {"square": "parallelpiped", "round": "ellipsoidal", "gauss": "gaussian", "tophat": "tophat-spot"}


@dataclass
class Model:
    """Everything resolved from an Experiment: SI geometry and the kernel's arrays."""

    experiment: Experiment
    detector: DetectorGeometry
    sources: Sources
    crystal: CrystalModel
    structure: StructureModel
    oversample: int
    oversample_auto: bool
    recommended_oversample: int
    steps: int
    fluence: float
    wavelength: float            # lambda0 (m)
    I_bg: float
    water: float                 # m
    dmin: float                  # m
    geom: np.ndarray
    fpar: np.ndarray
    ipar: np.ndarray
    mask: np.ndarray
    warnings: list = field(default_factory=list)

    @property
    def shape(self):
        return (self.detector.spixels, self.detector.fpixels)

    @property
    def scale(self):
        """r_e^2 * fluence / steps, applied after the kernel."""
        return R_E_SQR * self.fluence / self.steps

    @property
    def inner_evaluations(self):
        """pixels * oversample^2 * sources * phisteps * domains * thicksteps (ROI and mask)."""
        xmin, xmax, ymin, ymax = self.roi_clipped
        if self.experiment.detector.mask is not None:
            npix = int(self.mask[ymin:ymax + 1, xmin:xmax + 1].sum())
        else:
            npix = (xmax - xmin + 1) * (ymax - ymin + 1)
        return (npix * self.oversample ** 2 * len(self.sources.wavelengths)
                * self.crystal.orientations.shape[0] * self.detector.thicksteps)

    @property
    def roi_clipped(self):
        xmin, xmax, ymin, ymax = self.detector.roi
        return (max(xmin, 0), min(xmax, self.detector.fpixels - 1),
                max(ymin, 0), min(ymax, self.detector.spixels - 1))


def build_model(exp, warn=None):
    """Resolve an :class:`Experiment` into a :class:`Model` (pure numpy, no kernel call)."""
    if not isinstance(exp, Experiment):
        raise ParameterError(f"expected an nbragg.Experiment, got {type(exp).__name__}")
    warnings = []

    def _warn(msg):
        warnings.append(msg)
        if warn is not None:
            warn(msg)
        else:
            log.warning(msg)

    det = resolve_detector(exp.detector, warn=_warn)
    src = resolve_sources(exp.beam, det.beam, det.polar)
    cry = resolve_crystal(exp.crystal, det.spindle, warn=_warn)
    st = resolve_structure(exp.structure, exp.crystal.Na, exp.crystal.Nb, exp.crystal.Nc)

    lambda0 = exp.beam.wavelength / 1e10
    lengths = np.sqrt((cry.real0 ** 2).sum(axis=1))
    xtal_max = max(lengths[0] * cry.Na, lengths[1] * cry.Nb, lengths[2] * cry.Nc)
    recip_pixel = lambda0 * det.distance / det.pixel
    rec = math.ceil(3.0 * xtal_max / recip_pixel) if recip_pixel != 0 else 1
    if rec <= 0:
        rec = 1
    s = exp.sampling
    if s.oversample is None or s.oversample <= 0:
        oversample, auto = rec, True
    else:
        oversample, auto = s.oversample, False
        if oversample < rec:
            _warn(f"maximum dimension of sample is {xtal_max * 1e10:g} A but reciprocal pixel size is "
                  f"{recip_pixel * 1e10:g} A; intensity may vary significantly across a pixel "
                  f"(nanoBragg recommends -oversample {rec})")
    nsrc = len(src.wavelengths)
    steps = nsrc * cry.mosaic_domains * cry.phisteps * oversample * oversample

    fluence = exp.beam.fluence
    water = s.water / 1e6
    I_bg = WATER_F * WATER_F * R_E_SQR * fluence * water * water * water * 1e6 * AVOGADRO / WATER_MW

    geom = np.array([det.pix0, det.fdet, det.sdet, det.odet, det.beam, det.polar], dtype=np.float64)
    fpar = np.zeros(K.NF)
    fpar[K.F_PIXEL] = det.pixel
    fpar[K.F_SUBPIXEL] = det.pixel / oversample
    fpar[K.F_DISTANCE] = det.distance
    fpar[K.F_CLOSE_DISTANCE] = det.close_distance
    fpar[K.F_THICKSTEP] = det.thickstep
    fpar[K.F_MU] = det.mu
    fpar[K.F_KAHN] = exp.beam.polarization
    fpar[K.F_DMIN] = s.dmin * 1e-10
    fpar[K.F_NA] = cry.Na
    fpar[K.F_NB] = cry.Nb
    fpar[K.F_NC] = cry.Nc
    fpar[K.F_FUDGE] = cry.fudge
    fpar[K.F_DEFAULT_F] = st.default_F
    fpar[K.F_I_BG] = I_bg
    fpar[K.F_THICK] = det.thick
    ipar = np.zeros(K.NI, dtype=np.int64)
    ipar[K.I_OVERSAMPLE] = oversample
    ipar[K.I_THICKSTEPS] = det.thicksteps
    ipar[K.I_CURVED] = int(det.curved)
    ipar[K.I_POINT_PIXEL] = int(det.point_pixel)
    ipar[K.I_OS_OMEGA] = int(s.oversample_omega)
    ipar[K.I_OS_POLAR] = int(s.oversample_polar)
    ipar[K.I_OS_THICK] = int(s.oversample_thick)
    ipar[K.I_NOPOLAR] = int(exp.beam.nopolar)
    ipar[K.I_SHAPE] = _SHAPE_CODES[cry.shape]
    ipar[K.I_HAS_HKLS] = int(st.hkls > 0)
    ipar[K.I_INTERPOLATE] = int(st.interpolate)
    ipar[K.I_WATER] = int(water != 0.0)
    ipar[K.I_ROI:K.I_ROI + 4] = det.roi
    ipar[K.I_HKL_MIN:K.I_HKL_MIN + 3] = st.hkl_min
    ipar[K.I_HKL_MAX:K.I_HKL_MAX + 3] = st.hkl_max
    if exp.detector.mask is not None:
        mask = np.ascontiguousarray(exp.detector.mask, dtype=np.uint8)
        ipar[K.I_USE_MASK] = 1
    else:
        mask = np.ones((1, 1), dtype=np.uint8)
    if s.oversample_thick and det.thick == 0.0:
        _warn("-oversample_thick without a sensor thickness: nanoBragg.c multiplies every term by a "
              "capture fraction of 0, so the image is 0; nbragg does the same")
    if exp.beam.nopolar and s.oversample_polar:
        _warn("-nopolar has no effect with -oversample_polar: nanoBragg.c still applies the "
              "polarization factor to every sub-pixel; nbragg does the same")
    return Model(
        experiment=exp, detector=det, sources=src, crystal=cry, structure=st,
        oversample=oversample, oversample_auto=auto, recommended_oversample=rec, steps=steps,
        fluence=fluence, wavelength=lambda0, I_bg=I_bg, water=water, dmin=s.dmin * 1e-10,
        geom=geom, fpar=fpar, ipar=ipar, mask=mask, warnings=warnings,
    )


def kernel_args(model, precision="float64"):
    """The arrays the forward kernel takes, in order; with precision "float32" the float
    arrays are float32 (for the single-precision twins)."""
    args = (model.geom, model.fpar, model.ipar,
            np.ascontiguousarray(model.sources.directions), np.ascontiguousarray(model.sources.wavelengths),
            np.ascontiguousarray(model.crystal.orientations), np.ascontiguousarray(model.crystal.recip0),
            model.structure.grid, model.mask)
    if precision == "float64":
        return args
    return tuple(a.astype(np.float32) if a.dtype == np.float64 else a for a in args)


PRECISIONS = ("float64", "float32")


def check_precision(precision):
    if precision not in PRECISIONS:
        raise ParameterError(f"precision {precision!r} is not known (choose one of {', '.join(PRECISIONS)})")
    return precision


def set_threads(threads):
    """Set Numba's thread count (None leaves it as it is); returns the previous count."""
    import numba
    prev = numba.get_num_threads()
    if threads is not None:
        threads = int(threads)
        if threads < 1 or threads > numba.config.NUMBA_NUM_THREADS:
            raise ParameterError(
                f"threads = {threads}: must be between 1 and {numba.config.NUMBA_NUM_THREADS}")
        numba.set_num_threads(threads)
    return prev


BACKENDS = ("cpu", "cuda")


def check_backend(backend):
    """Validate a backend name; for "cuda", also that numba-cuda and a device (or the
    simulator) are there.  Raises BackendError naming what is missing."""
    if backend not in BACKENDS:
        raise BackendError(f"backend {backend!r} is not known (choose one of {', '.join(BACKENDS)})")
    if backend == "cuda":
        cuda_kernels().check_available()
    return backend


def cuda_kernels():
    """The GPU kernel module (imported on first use: it needs numba-cuda)."""
    try:
        from .kernels import cuda as C
    except ImportError as exc:
        raise BackendError(f"backend 'cuda' needs numba-cuda, which cannot be imported ({exc}); "
                           "install it with: pip install \"nbragg[cuda]\"") from None
    return C


def render(model, backend="cpu", threads=None, progress=None, precision="float64"):
    """Run the forward kernel; returns (image in photons, omega sum over sub-pixels).

    ``progress(rows_done, rows_total)`` (optional) is called as blocks of detector rows
    finish; the image does not depend on it.  ``precision="float32"`` runs the
    single-precision twin of the kernel (the image is returned as float64).
    """
    single = check_precision(precision) == "float32"
    if check_backend(backend) == "cuda":
        return cuda_kernels().render(model, progress=progress, single=single)
    dtype = np.float32 if single else np.float64
    image = np.zeros(model.shape, dtype=dtype)
    omega_rows = np.zeros(model.shape[0], dtype=dtype)
    forward = cpu_single(K.forward) if single else K.forward
    prev = set_threads(threads)
    try:
        args = kernel_args(model, precision)
        if progress is None:
            forward(*args, image, omega_rows)
        else:
            xmin, xmax, ymin, ymax = model.roi_clipped
            nrows = ymax - ymin + 1
            block = max(1, -(-nrows // 50))
            ipar = model.ipar.copy()
            for y0 in range(ymin, ymax + 1, block):
                y1 = min(y0 + block - 1, ymax)
                ipar[K.I_ROI + 2] = y0
                ipar[K.I_ROI + 3] = y1
                forward(args[0], args[1], ipar, *args[3:], image, omega_rows)
                progress(y1 - ymin + 1, nrows)
    finally:
        if threads is not None:
            set_threads(prev)
    image = image.astype(np.float64, copy=False)
    image *= model.scale
    return image, float(omega_rows.astype(np.float64, copy=False).sum())


@dataclass
class Stats:
    """nanoBragg's run statistics (over the ROI and mask, as the C computes them)."""

    max_I: float
    max_I_fast: int          # pixel indices of the maximum (first one in scan order)
    max_I_slow: int
    max_I_fast_m: float      # sub-pixel position where nanoBragg reports the maximum
    max_I_slow_m: float
    mean: float
    rms: float
    rmsd: float
    solid_angle_sr: float
    pixels: int


@dataclass
class Result:
    """A simulated image with its statistics and resolved settings."""

    image: np.ndarray
    stats: Stats
    model: Model

    @property
    def settings(self):
        """The resolved settings, keyed like nanoBragg's printed report."""
        from .report import resolved_settings
        return resolved_settings(self.model)

    @property
    def experiment(self):
        return self.model.experiment


@njit(cache=True)
def _c_stats(image, mask, use_mask, xmin, xmax, ymin, ymax):
    # nanoBragg.c's statistics: sequential double sums over the rendered pixels
    # (ROI and mask) for max, mean and rms; the rmsd loop covers the whole ROI
    total = 0.0
    sumsqr = 0.0
    n = 0
    max_I = 0.0
    mf = 0
    ms = 0
    for s in range(ymin, ymax + 1):
        for f in range(xmin, xmax + 1):
            if use_mask and mask[s, f] == 0:
                continue
            v = image[s, f]
            if v > max_I:
                max_I = v
                mf = f
                ms = s
            total += v
            sumsqr += v * v
            n += 1
    nn = n if n > 0 else 1
    avg = total / nn
    nn = n if n > 1 else 2
    rms = math.sqrt(sumsqr / (nn - 1))
    dev = 0.0
    m = 0
    for s in range(ymin, ymax + 1):
        for f in range(xmin, xmax + 1):
            t = image[s, f] - avg
            dev += t * t
            m += 1
    if m <= 1:
        m = 2
    return max_I, mf, ms, avg, rms, math.sqrt(dev / (m - 1)), n


def compute_stats(model, image, omega_sum):
    """max_I (and where), mean, rms over ROI & mask; rmsd over the ROI (as nanoBragg.c)."""
    xmin, xmax, ymin, ymax = model.roi_clipped
    use_mask = model.experiment.detector.mask is not None
    max_I, mf, ms, avg, rms, rmsd, n = _c_stats(np.ascontiguousarray(image, dtype=np.float64), model.mask,
                                                use_mask, xmin, xmax, ymin, ymax)
    os_ = model.oversample
    sub = model.detector.pixel / os_
    fm = sub * (mf * os_ + os_ - 1) + sub / 2.0
    sm = sub * (ms * os_ + os_ - 1) + sub / 2.0
    return Stats(max_I=max_I, max_I_fast=mf, max_I_slow=ms, max_I_fast_m=fm, max_I_slow_m=sm,
                 mean=avg, rms=rms, rmsd=rmsd, solid_angle_sr=omega_sum / model.steps, pixels=n)


def simulate(experiment, backend="cpu", threads=None, warn=None, precision="float64"):
    """Simulate one image.

    Parameters
    ----------
    experiment : Experiment
    backend : "cpu" (Numba threads) or "cuda" (an NVIDIA GPU through numba-cuda)
    threads : number of CPU threads (None: Numba's default, all cores; ignored by "cuda")
    warn : callable receiving warning messages (default: the ``nbragg`` logger)
    precision : "float64" (nanoBragg's numbers) or "float32" (the same model computed in
        single precision, for speed on GPUs; the image is still returned as float64)

    Returns
    -------
    Result
        ``.image`` float64 photons, shape (spixels, fpixels); ``.stats``; ``.settings``.
    """
    check_precision(precision)
    model = build_model(experiment, warn=warn)
    image, omega_sum = render(model, backend=backend, threads=threads, precision=precision)
    return Result(image=image, stats=compute_stats(model, image, omega_sum), model=model)
