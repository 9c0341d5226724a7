"""The one data path: Experiment -> model arrays -> kernel -> scaled image -> Result.

The command line, refinement and dataset generation all call :func:`simulate` (or
:func:`build_model` plus :func:`render`); none of them builds geometry itself.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from dataclasses import dataclass, field

import numpy as np
from . import _jitcache  # noqa: F401  (nbragg's cache keys, before any cached function)
from numba import njit

from .errors import BackendError, ParameterError
from .experiment import Experiment
from .kernels import cpu as K
from .kernels import physics
from .kernels.precision import cpu_single
from .kernels.scene import (Beam, Crystal, Detector, Sampling, Scene, Structure, as_single, kernel_layout,
                            layout_of, panel_index, roi_clipped)
from .models.beam import Sources, resolve_sources
from .models.crystal import CrystalModel, resolve_crystal
from .models.detector import (DetectorGeometry, experiment_panels, first_panel_geometry, nanobragg_panels,
                              resolve_detector)
from .models.structure import StructureModel, resolve_structure
from .units import AVOGADRO, R_E_SQR, WATER_F, WATER_MW

log = logging.getLogger("nbragg")

_SHAPE_CODES = {"square": physics.SQUARE, "round": physics.ROUND, "gauss": physics.GAUSS, "tophat": physics.TOPHAT,
                "gauss_domain": physics.DOMAIN}


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
    scale: float                 # r_e^2 * fluence / steps, applied after the kernel
    scenes: tuple                # what the kernels read (kernels/scene.py), one Scene per
                                 # detector panel; the blocks other than det are shared
    panels: list                 # the detector's panels (models.detector.Panel)
    panel_maker: object = None   # resolved geometry -> panels (None: nanoBragg's one panel)
    warnings: list = field(default_factory=list)
    resolved: tuple = None       # (det, src, cry) as resolve() gave them (the derivatives'
                                 # set-up passes reuse the parts a parameter does not move)

    @property
    def scene(self):
        """The Scene of a one-panel model (of the first panel of any other)."""
        return self.scenes[0]

    @functools.cached_property
    def layout(self):
        """Offsets of the inputs' derivatives in a flat vector (kernels/scene.py)."""
        return layout_of(self.scenes[0], len(self.scenes))

    @functools.cached_property
    def kernel_layout(self):
        """The one-panel layout the kernels read."""
        return kernel_layout(self.layout)

    @property
    def shape(self):
        """The image's shape: (spixels, fpixels), or (panels, spixels, fpixels)."""
        one = (self.scene.det.spixels, self.scene.det.fpixels)
        return one if len(self.scenes) == 1 else (len(self.scenes),) + one

    @property
    def inner_evaluations(self):
        """pixels * oversample^2 * sources * phisteps * domains * thicksteps (ROI and mask)."""
        samples = 0
        for S in self.scenes:
            xmin, xmax, ymin, ymax = roi_clipped(S.det)
            if S.det.use_mask:
                npix = int(S.det.mask[ymin:ymax + 1, xmin:xmax + 1].sum())
            else:
                npix = max(0, xmax - xmin + 1) * max(0, ymax - ymin + 1)
            samples += npix * S.det.thicksteps
        return (samples * self.oversample ** 2 * len(self.sources.wavelengths)
                * self.crystal.orientations.shape[0])

    @property
    def roi_clipped(self):
        return roi_clipped(self.scene.det)


# the automatic oversampling above which nbragg warns, and above which it asks for an
# explicit -oversample (a pixel size or distance in the wrong unit lands there)
AUTO_OVERSAMPLE_WARN = 16
AUTO_OVERSAMPLE_MAX = 100


def resolve(exp, warn=None, reuse=None):
    """The set-up: detector, sources, crystal and structure resolved from an Experiment
    the way nanoBragg.c does.  Runs on real values, and on complex ones for the
    complex-step derivatives of the kernel inputs (params.py).

    ``reuse``: (experiment, (det, src, cry)) resolved before from an experiment that
    differs from ``exp`` in a few records (a complex step moves one): a part whose inputs
    are unchanged -- the same record objects, equal vectors from the detector -- is taken
    from there instead of being resolved again."""
    physical = exp.physics == "physical"
    base, (det0, src0, cry0) = reuse or (None, (None, None, None))
    same_mode = base is not None and base.physics == exp.physics
    if same_mode and exp.detector is base.detector:
        det = det0
    else:
        det = resolve_detector(exp.detector, warn=warn, physical=physical)
    if same_mode and exp.beam is base.beam and _equal(det.beam, det0.beam) and _equal(det.polar, det0.polar):
        src = src0
    else:
        src = resolve_sources(exp.beam, det.beam, det.polar, honour_weights=physical)
    if same_mode and exp.crystal is base.crystal and _equal(det.spindle, det0.spindle):
        cry = cry0
    else:
        cry = resolve_crystal(exp.crystal, det.spindle, warn=warn)
    return det, src, cry


def _equal(a, b):
    """Equal vectors (complex ones with no imaginary part equal their real twins)."""
    return a is b or np.array_equal(np.asarray(a), np.asarray(b))


def detector_panels(maker, exp, det):
    """The detector's panels for the resolved geometry ``det``: ``maker(det)``, or without
    one the panel nanoBragg's conventions place."""
    if maker is None:
        if exp.detector.panels is not None:
            return experiment_panels(exp.detector, det.beam, det.point_pixel)
        return nanobragg_panels(det, exp.detector.mask)
    return list(maker(det))


def kernel_inputs(exp, det, panels, src, cry, oversample, steps):
    """The differentiable kernel inputs (every field of ``kernels.scene.FIELDS``; the det
    fields with a leading panel axis), from the resolved set-up.  The one place each is
    computed: the Scenes are built from these values, and their derivatives are these
    values' complex steps."""
    fluence = exp.beam.fluence
    water = exp.sampling.water / 1e6
    water_molecules = water * water * water * 1e6 * AVOGADRO / WATER_MW      # a cube of water, 1 g/cm^3
    physical = exp.physics == "physical"

    def per_panel(name):
        return np.array([getattr(p, name) for p in panels])
    return dict(
        pix0=per_panel("pix0"), fdet=per_panel("fdet"), sdet=per_panel("sdet"), odet=per_panel("odet"),
        pixel=per_panel("pixel"), subpixel=per_panel("pixel") / oversample, distance=per_panel("distance"),
        close_distance=per_panel("close_distance"), thickstep=per_panel("thickstep"), mu=per_panel("mu"),
        beam=det.beam, polar_axis=det.polar, kahn=exp.beam.polarization, sources=src.directions,
        lambdas=src.wavelengths, weights=src.weights,
        orients=cry.orientations, recip=cry.recip0, Na=cry.Na, Nb=cry.Nb, Nc=cry.Nc, N_ab=exp.crystal.N_ab,
        N_ac=exp.crystal.N_ac, N_bc=exp.crystal.N_bc, fudge=cry.fudge,
        default_F=exp.structure.default_F, B=exp.structure.B_iso * 1e-20,
        beta=aniso_beta(exp.structure.U_aniso, cry.recip0),
        # nanoBragg's water starts the pixel's sum (and meets r_e^2 fluence twice); the
        # physical mode's is an amorphous material of its own (engine.amorphous_tables)
        I_bg=0.0 if physical else WATER_F * WATER_F * R_E_SQR * fluence * water * water * water * 1e6 * AVOGADRO
        / WATER_MW,
        bg_amount=np.array([m.scale * molecules(m) * cry.mosaic_domains * cry.phisteps for m in exp.background]
                           + ([water_molecules * cry.mosaic_domains * cry.phisteps]
                              if physical and exp.sampling.water != 0.0 else [])),
        scale=R_E_SQR * fluence / steps,
    )


def aniso_beta(U, recip):
    """beta_ij = 2 pi^2 U_ij a*_i a*_j (CIF's U_ij, Angstrom^2; a*_i the reciprocal axes'
    lengths, 1/Angstrom), as (b11, b22, b33, b12, b13, b23); zeros without U."""
    if U is None:
        return np.zeros(6)
    lengths = np.sqrt((recip * recip).sum(axis=1))
    pairs = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))
    return np.array([2.0 * np.pi ** 2 * U[j] * lengths[a] * lengths[b] for j, (a, b) in enumerate(pairs)])


def density_and_molecules(material):
    """(density in g/m^3, molecules in the volume) of an amorphous material, computed as
    nonBragg.c does (a given count passes through the density and back)."""
    volume = material.thickness / 1000.0 * (material.width / 1000.0) * (material.height / 1000.0)
    mw = material.mw_g_mol
    density = material.density_g_cm3 * 1e6         # g/m^3
    if material.molecules is not None:
        density = material.molecules / volume / AVOGADRO * mw
    return density, volume * density * AVOGADRO / mw


def molecules(material):
    """Molecules of an amorphous material in its volume (see density_and_molecules)."""
    return density_and_molecules(material)[1]


def amorphous_tables(background, water=False):
    """(stol, F, start): the tables of the materials, concatenated (see
    kernels.physics.amorphous_F); with ``water``, then nanoBragg's water: F = 2.57 at every
    sin(theta)/lambda (the physical mode's)."""
    xs, Fs, start = [], [], [0]
    tables = [(m.parsed.stol_per_m, m.parsed.F) for m in background]
    if water:
        tables.append((np.array([0.0, 1e30]), np.array([WATER_F, WATER_F])))
    for x, F in tables:
        xs.append(x)
        Fs.append(F)
        start.append(start[-1] + len(F))
    if not xs:
        return np.zeros(0), np.zeros(0), np.zeros(1, dtype=np.int64)
    return np.concatenate(xs), np.concatenate(Fs), np.array(start, dtype=np.int64)


def build_model(exp, warn=None, panels=None):
    """Resolve an :class:`Experiment` into a :class:`Model` (pure numpy, no kernel call).

    ``panels(geometry) -> list of models.detector.Panel`` replaces the one panel that
    nanoBragg's conventions place (it must be written with arithmetic only: the
    derivatives run it on complex numbers)."""
    if not isinstance(exp, Experiment):
        raise ParameterError(f"expected an nbragg.Experiment, got {type(exp).__name__}")
    warnings = []

    def _warn(msg):
        warnings.append(msg)
        if warn is not None:
            warn(msg)
        else:
            log.warning(msg)

    det, src, cry = resolved = resolve(exp, warn=_warn)
    st = resolve_structure(exp.structure, exp.crystal.Na, exp.crystal.Nb, exp.crystal.Nc)
    panel_list = detector_panels(panels, exp, det)
    if not panel_list:
        raise ParameterError("the detector has no panels")
    if exp.detector.panels is not None and panels is None:
        # reports and image headers describe the first panel; the oversampling follows
        # the nearest one
        det = first_panel_geometry(det, panel_list[0])
        nearest = min(float(np.real(p.close_distance)) for p in panel_list)
    else:
        nearest = det.distance

    lambda0 = exp.beam.wavelength / 1e10
    lengths = np.sqrt((cry.real0 ** 2).sum(axis=1))
    xtal_max = max(lengths[0] * cry.Na, lengths[1] * cry.Nb, lengths[2] * cry.Nc)
    recip_pixel = lambda0 * nearest / det.pixel
    rec = math.ceil(3.0 * xtal_max / recip_pixel) if recip_pixel != 0 else 1
    if rec <= 0:
        rec = 1
    s = exp.sampling
    # without a structure factor anywhere (an amorphous background alone) the Bragg blocks
    # are skipped, and the crystal's size sets no oversampling
    physical = exp.physics == "physical"
    # (the physical mode's water is an amorphous term of its own)
    bragg = bool(st.hkls > 0 or exp.structure.default_F != 0.0 or (s.water != 0.0 and not physical))
    if not bragg:
        rec = 1
    if s.oversample is None or s.oversample <= 0:
        oversample, auto = rec, True
        why = (f"automatic oversampling of {rec} (each pixel sampled {rec * rec} times: the crystal is "
               f"{xtal_max * 1e10:g} A across and a pixel spans {recip_pixel * 1e10:g} A of reciprocal space)")
        if rec > AUTO_OVERSAMPLE_MAX:
            raise ParameterError(
                f"{why} is more than {AUTO_OVERSAMPLE_MAX}: check the units of the pixel size (-pixel, "
                f"Detector.pixel_size: mm), the distance (-distance, Detector.distance: mm), the cell and N; "
                f"to run it anyway, give the oversampling (-oversample {rec}, Sampling.oversample)")
        if rec > AUTO_OVERSAMPLE_WARN:
            _warn(f"{why}: this image will take long; check the units of the pixel size and the distance (mm)")
    else:
        oversample, auto = s.oversample, False
        if oversample < rec:
            _warn(f"maximum dimension of sample is {xtal_max * 1e10:g} A but reciprocal pixel size is "
                  f"{recip_pixel * 1e10:g} A; intensity may vary significantly across a pixel "
                  f"(nanoBragg recommends -oversample {rec})")
    nsrc = len(src.wavelengths)
    steps = nsrc * cry.mosaic_domains * cry.phisteps * oversample * oversample
    u = kernel_inputs(exp, det, panel_list, src, cry, oversample, steps)
    bg_stol, bg_F, bg_start = amorphous_tables(exp.background, water=physical and s.water != 0.0)
    for m in exp.background:
        for note in m.notes:
            _warn(note)

    shared = dict(
        beam=Beam(
            beam=_vec(u["beam"]), polar_axis=_vec(u["polar_axis"]), kahn=float(u["kahn"]),
            nopolar=bool(exp.beam.nopolar), sources=_owned(u["sources"], np.float64),
            lambdas=_owned(u["lambdas"], np.float64),
            weights=_owned(u["weights"], np.float64)),
        xtal=Crystal(
            orients=_owned(u["orients"], np.float64),
            recip=_owned(u["recip"], np.float64), Na=float(u["Na"]), Nb=float(u["Nb"]),
            Nc=float(u["Nc"]), N_ab=float(u["N_ab"]), N_ac=float(u["N_ac"]), N_bc=float(u["N_bc"]),
            fudge=float(u["fudge"]), shape=int(_SHAPE_CODES[cry.shape])),
        fhkl=Structure(
            grid=_owned(st.grid, np.float64), hkl_min=np.array(st.hkl_min, dtype=np.int64),
            hkl_max=np.array(st.hkl_max, dtype=np.int64), has_hkls=bool(st.hkls > 0),
            interpolate=bool(st.interpolate), default_F=float(u["default_F"]), B=float(u["B"]),
            beta=_owned(u["beta"], np.float64), aniso=exp.structure.U_aniso is not None),
        samp=Sampling(
            # the physical mode takes every factor at every sample (and multiplies the
            # sample's terms by them: pixel.add_term)
            os_omega=bool(s.oversample_omega or physical),
            os_polar=bool(s.oversample_polar or (physical and not exp.beam.nopolar)),
            os_thick=bool(s.oversample_thick or physical), physical=physical,
            dmin=float(s.dmin * 1e-10), I_bg=float(u["I_bg"]), water=bool(s.water != 0.0 and not physical),
            bragg=bragg,
            bg_stol=bg_stol, bg_F=bg_F, bg_start=bg_start, bg_amount=_owned(u["bg_amount"], np.float64)),
    )
    scenes = tuple(Scene(det=_detector_block(u, p, panel, oversample), **shared)
                   for p, panel in enumerate(panel_list))
    if len({(S.det.spixels, S.det.fpixels) for S in scenes}) > 1:
        raise ParameterError("the detector's panels differ in size: "
                             + ", ".join(f"{S.det.fpixels}x{S.det.spixels}" for S in scenes))
    if s.oversample_thick and det.thick == 0.0:
        _warn("-oversample_thick without a sensor thickness: nanoBragg.c multiplies every term by a "
              "capture fraction of 0, so the image is 0; nbragg does the same")
    if st.hkls == 0 and exp.structure.default_F == 0.0 and s.water == 0.0 and not exp.background:
        _warn("no structure factors (Structure.Fhkl is None and Structure.default_F is 0), no water and no "
              "background: every pixel is 0; give Structure(default_F=...) or a structure-factor grid")
    if exp.beam.nopolar and s.oversample_polar:
        _warn("-nopolar has no effect with -oversample_polar: nanoBragg.c still applies the "
              "polarization factor to every sub-pixel; nbragg does the same")
    return Model(
        experiment=exp, detector=det, sources=src, crystal=cry, structure=st,
        oversample=oversample, oversample_auto=auto, recommended_oversample=rec, steps=steps,
        fluence=exp.beam.fluence, wavelength=lambda0, I_bg=u["I_bg"], water=s.water / 1e6, dmin=s.dmin * 1e-10,
        scale=u["scale"], scenes=scenes, panels=panel_list, panel_maker=panels, warnings=warnings,
        resolved=resolved,
    )


def _owned(a, dtype):
    """``a`` as a writable C-contiguous array (a copy only where it is not one already):
    Numba types read-only arrays apart, so an input that arrived read-only (a validated
    Experiment field) would compile every kernel again."""
    return np.require(a, dtype=dtype, requirements=("C", "W"))


def _vec(v):
    return _owned(v, np.float64).reshape(3)


def _detector_block(u, p, panel, oversample):
    """The det block of panel ``p`` (kernels/scene.py), from the inputs ``u``."""
    if panel.mask is not None:
        mask = _owned(panel.mask, np.uint8)
    else:
        mask = np.ones((1, 1), dtype=np.uint8)
    return Detector(
        pix0=_vec(u["pix0"][p]), fdet=_vec(u["fdet"][p]), sdet=_vec(u["sdet"][p]), odet=_vec(u["odet"][p]),
        pixel=float(u["pixel"][p]), subpixel=float(u["subpixel"][p]), distance=float(u["distance"][p]),
        close_distance=float(u["close_distance"][p]), thick=float(panel.thick), thickstep=float(u["thickstep"][p]),
        mu=float(u["mu"][p]), thicksteps=int(panel.thicksteps), oversample=int(oversample),
        curved=bool(panel.curved), point_pixel=bool(panel.point_pixel), fpixels=int(panel.fpixels),
        spixels=int(panel.spixels), roi=np.array(panel.roi, dtype=np.int64), mask=mask,
        use_mask=panel.mask is not None)


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


@contextlib.contextmanager
def _threads(threads):
    """Run with that many Numba threads (None: as it is), then restore the count."""
    prev = set_threads(threads)
    try:
        yield
    finally:
        if threads is not None:
            set_threads(prev)


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

    The image has the model's shape: (spixels, fpixels), or (panels, spixels, fpixels).
    ``progress(rows_done, rows_total)`` (optional) is called as blocks of detector rows
    finish; the image does not depend on it.  ``precision="float32"`` runs the
    single-precision twin of the kernel (the image is returned as float64).
    """
    single = check_precision(precision) == "float32"
    cuda = check_backend(backend) == "cuda"
    scenes = model.scenes
    P = len(scenes)
    spans = [max(0, ymax - ymin + 1) for xmin, xmax, ymin, ymax in (roi_clipped(S.det) for S in scenes)]
    total = sum(spans)
    images = []
    omega_sum = 0.0
    done = 0
    for p, S in enumerate(scenes):
        if cuda:
            img, om = cuda_kernels().render(S, progress=None if progress is None else
                                            (lambda r, n, d=done: progress(d + r, total)), single=single)
        else:
            img, om = _render_cpu(S, single, threads, progress, done, total)
        images.append(img)
        omega_sum += om
        done += spans[p]
    image = images[0] if P == 1 else np.stack(images)     # one panel: no copy
    image *= model.scale
    return image, omega_sum


def prepare(model, backend="cpu", precision="float64"):
    """Compile the forward kernel for this model (the first run on a machine, a minute or
    so) or load it from the cache, by rendering one pixel."""
    single = check_precision(precision) == "float32"
    S = model.scenes[0]
    xmin, xmax, ymin, ymax = roi_clipped(S.det)
    if xmax < xmin or ymax < ymin:
        return
    one = S._replace(det=S.det._replace(roi=np.array([xmin, xmin, ymin, ymin], dtype=np.int64)))
    if check_backend(backend) == "cuda":
        cuda_kernels().render(one, single=single)
    else:
        _render_cpu(one, single, None, None, 0, 0)


def _render_cpu(scene, single, threads, progress, done, total):
    """One panel on the CPU: (unscaled image, omega sum)."""
    dtype = np.float32 if single else np.float64
    shape = (scene.det.spixels, scene.det.fpixels)
    image = np.zeros(shape, dtype=dtype)
    omega_rows = np.zeros(shape[0], dtype=dtype)
    forward = cpu_single(K.forward) if single else K.forward
    if single:
        scene = as_single(scene)
    with _threads(threads):
        xmin, xmax, ymin, ymax = roi_clipped(scene.det)
        if progress is None:
            forward(*scene, ymin, ymax, image, omega_rows, True)
        else:
            nrows = ymax - ymin + 1
            block = max(1, -(-nrows // 50))
            for y0 in range(ymin, ymax + 1, block):
                y1 = min(y0 + block - 1, ymax)
                forward(*scene, y0, y1, image, omega_rows, True)
                progress(done + y1 - ymin + 1, total)
    return image.astype(np.float64, copy=False), float(omega_rows.astype(np.float64, copy=False).sum())


def tangent_image(model, d, backend="cpu", threads=None):
    """The tangent kernel: (J, image) with J (*shape, P) = d(image)/d(theta_p) for the
    tangent directions d (P, layout.size) (see :mod:`nbragg.kernels.scene`), and the
    image (photons) computed in the same pass."""
    from .kernels import tangent as T      # (derivative kernels: loaded when asked for)
    L = model.layout
    d = _owned(d, np.float64).reshape(-1, L.size)
    P = d.shape[0]
    scenes = model.scenes
    kL = model.kernel_layout
    J = np.zeros((len(scenes),) + model.shape[-2:] + (P,))
    image = np.zeros((len(scenes),) + model.shape[-2:])
    for p, S in enumerate(scenes):
        dp = d if len(scenes) == 1 else np.ascontiguousarray(d[:, panel_index(L, p)])
        if check_backend(backend) == "cuda":
            J[p], image[p] = cuda_kernels().run_tangent(S, kL, dp, model.scale)
            continue
        flags, has_dori, base = T.orientation_tangents(dp, kL, S.xtal.orients)
        with _threads(threads):
            T.tangent(*S, dp, kL, model.scale, has_dori, base, flags, J[p], image[p], True)
    return (J[0], image[0]) if len(scenes) == 1 else (J, image)


def adjoint_image(model, upstream, backend="cpu", threads=None, want_image=False, want_F=True):
    """The adjoint kernel for L = sum(upstream * image): returns (g, gF, image) with g the
    flat dL/d(scene inputs) in ``model.layout`` (the "scale" entry holds dL/d(scale) times
    the scale, i.e. sum(upstream * image)), gF dL/d(structure-factor grid) (zero when not
    ``want_F``), and with ``want_image`` the image of the pixels with non-zero upstream."""
    from .kernels import adjoint as A      # (derivative kernels: loaded when asked for)
    L = model.layout
    kL = model.kernel_layout
    scenes = model.scenes
    ups = _owned(upstream, np.float64).reshape((len(scenes),) + model.shape[-2:])
    grid = model.scene.fhkl.grid
    flat = np.zeros(L.size)
    gF = np.zeros(grid.shape)
    image = np.zeros((len(scenes),) + model.shape[-2:]) if want_image else None
    for p, S in enumerate(scenes):
        idx = panel_index(L, p)
        if check_backend(backend) == "cuda":
            g_p, gF_p, img = cuda_kernels().raw_adjoint(S, kL, ups[p], model.scale, want_F, want_image)
            flat[idx] += g_p
            if gF_p is not None:
                gF += gF_p
            if want_image:
                image[p] = img
            continue
        xmin, xmax, ymin, ymax = roi_clipped(S.det)
        nchunks = A.n_chunks(ymax - ymin + 1, grid.size, 8 * ups[p].size)
        g_c = np.zeros((nchunks, kL.size))
        gF_c = np.zeros((nchunks, grid.size))
        img = image[p] if want_image else np.zeros((0, 0))
        with _threads(threads):
            A.adjoint(*S, kL, ups[p], model.scale, nchunks, g_c, gF_c, img, True)
        # fixed-order reductions, over chunks and then panels: independent of the thread count
        flat[idx] += g_c.sum(axis=0)
        gF += gF_c.sum(axis=0).reshape(grid.shape)
    if image is not None and len(scenes) == 1:
        image = image[0]
    return _per_scale(model, flat), gF, image


def _per_scale(model, flat):
    """The kernels accumulate sum(upstream * image) in the "scale" entry; the cotangent
    holds dL/d(scale) there."""
    L = model.layout
    flat[L.scale] = flat[L.scale] / model.scale if model.scale != 0 else 0.0
    return flat


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
    max_I_panel: int = 0     # the maximum's panel (multi-panel detectors)


@dataclass
class Result:
    """A simulated image with its statistics and resolved settings."""

    image: np.ndarray
    stats: Stats
    model: Model
    detected: object = None     # response.Detected when the Experiment has a response
    reflections: object = None  # with labels=True: the reflection table (nbragg.labels)
    labels: object = None       # with labels=True: per-pixel label images (nbragg.labels.Labels)

    @property
    def settings(self):
        """The resolved settings, keyed like nanoBragg's printed report."""
        from .report import resolved_settings
        return resolved_settings(self.model)

    @property
    def experiment(self):
        return self.model.experiment

    @property
    def panels(self):
        """The panels' names, in the order of the image's first axis (a panel without a
        name is called by its index)."""
        user = self.model.experiment.detector.panels
        if user is not None and self.model.panel_maker is None:
            return tuple(p.name or str(i) for i, p in enumerate(user))
        return tuple(str(i) for i in range(len(self.model.scenes)))


@njit(cache=True)
def _c_stats(images, masks, use_mask, rois):
    # nanoBragg.c's statistics: sequential double sums over the rendered pixels (ROI and
    # mask) for max, mean and rms; the rmsd loop covers the whole ROI.  Panel by panel:
    # images (P, S, F), masks (P, ., .), use_mask (P,), rois (P, 4) clipped
    total = 0.0
    sumsqr = 0.0
    n = 0
    max_I = 0.0
    mp = 0
    mf = 0
    ms = 0
    for p in range(images.shape[0]):
        xmin, xmax, ymin, ymax = rois[p, 0], rois[p, 1], rois[p, 2], rois[p, 3]
        for s in range(ymin, ymax + 1):
            for f in range(xmin, xmax + 1):
                if use_mask[p] and masks[p, s, f] == 0:
                    continue
                v = np.float64(images[p, s, f])       # (float32 images: sums in double, as the C)
                if v > max_I:
                    max_I = v
                    mp = p
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
    for p in range(images.shape[0]):
        xmin, xmax, ymin, ymax = rois[p, 0], rois[p, 1], rois[p, 2], rois[p, 3]
        for s in range(ymin, ymax + 1):
            for f in range(xmin, xmax + 1):
                t = np.float64(images[p, s, f]) - avg
                dev += t * t
                m += 1
    if m <= 1:
        m = 2
    return max_I, mp, mf, ms, avg, rms, math.sqrt(dev / (m - 1)), n


def compute_stats(model, image, omega_sum):
    """max_I (and where), mean, rms over ROI & mask; rmsd over the ROI (as nanoBragg.c).
    Over all panels of a multi-panel detector, the maximum's panel in ``max_I_panel``."""
    dets = [S.det for S in model.scenes]
    image = np.asarray(image)
    images = np.ascontiguousarray(image, dtype=image.dtype if image.dtype == np.float32 else np.float64)
    images = images.reshape((len(dets),) + model.shape[-2:])
    use_mask = np.array([d.use_mask for d in dets])
    if use_mask.any():
        masks = np.stack([d.mask if d.use_mask else np.ones(images.shape[1:], np.uint8) for d in dets])
    else:
        masks = np.ones((len(dets), 1, 1), np.uint8)
    rois = np.array([roi_clipped(d) for d in dets], dtype=np.int64)
    max_I, mp, mf, ms, avg, rms, rmsd, n = _c_stats(images, masks, use_mask, rois)
    os_ = model.oversample
    sub = dets[mp].pixel / os_
    fm = sub * (mf * os_ + os_ - 1) + sub / 2.0
    sm = sub * (ms * os_ + os_ - 1) + sub / 2.0
    return Stats(max_I=max_I, max_I_fast=mf, max_I_slow=ms, max_I_fast_m=fm, max_I_slow_m=sm,
                 mean=avg, rms=rms, rmsd=rmsd, solid_angle_sr=omega_sum / model.steps, pixels=n,
                 max_I_panel=mp)


def simulate(experiment, backend="cpu", threads=None, warn=None, precision="float64", labels=False):
    """Simulate one image.

    Parameters
    ----------
    experiment : Experiment
    backend : "cpu" (Numba threads) or "cuda" (an NVIDIA GPU through numba-cuda)
    threads : number of CPU threads (None: Numba's default, all cores; ignored by "cuda")
    warn : callable receiving warning messages (default: the ``nbragg`` logger)
    precision : "float64" (nanoBragg's numbers) or "float32" (the same model computed in
        single precision, for speed on GPUs; the image is still returned as float64)
    labels : also label the image (:mod:`nbragg.labels`): ``.reflections``, a table of
        the reflections (h k l panel fast slow photons partiality d), and ``.labels``,
        per-pixel label images

    Returns
    -------
    Result
        ``.image`` float64 photons, shape (spixels, fpixels) (or (panels, spixels, fpixels)
        for a detector of several panels); ``.stats``; ``.settings``; with
        ``experiment.response``, ``.detected`` (:class:`nbragg.response.Detected`: the
        pixel values, counts and overloads).
    """
    check_precision(precision)
    model = build_model(experiment, warn=warn)
    image, omega_sum = render(model, backend=backend, threads=threads, precision=precision)
    detected = None
    if experiment.response is not None:
        from .response import respond
        detected = respond(image, experiment.response, experiment.detector.pixel_size)
    table = pixel_labels = None
    if labels:
        from .labels import label
        table, pixel_labels = label(model, threads=threads)
    return Result(image=image, stats=compute_stats(model, image, omega_sum), model=model, detected=detected,
                  reflections=table, labels=pixel_labels)
