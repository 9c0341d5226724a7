"""The named inputs of the kernels, and the one layout of their derivatives.

A :class:`Scene` is what every kernel reads: five blocks of SI values, each a NamedTuple
that Numba reads by field name on the CPU and the GPU.

``det``    the detector: position and axes, pixel and sub-pixel size, sensor layers, ROI, mask
``beam``   the sources (directions toward them, wavelengths), beam axis and polarization
``xtal``   orientations (rows a, b, c in metres), reciprocal cell (spot metric), N, shape
``fhkl``   the structure-factor grid and how it is looked up
``samp``   nanoBragg's sampling switches: ``-oversample_*``, ``-dmin``, water background

Derivatives of the inputs -- tangents d(input)/d(theta) and cotangents dL/d(input) -- are
flat float64 vectors in one layout, :class:`Layout`, made from the ``DIFF`` field lists of
the blocks below: a field's entries start at ``layout.<field>``.  A tangent for P
parameters is a (P, layout.size) array, a cotangent a (layout.size,) row, and contracting
one with the other is a dot product.  The structure-factor grid's cotangent is kept apart
(it is as large as the grid, and the GPU sums it in fixed point).

Orientation derivatives are stored as (9, npad): row 3 i + j is d(orientation[:, i, j]),
over orientations padded to a multiple of 8 (the vector loops' layout).

Detectors are lists of panels.  A kernel reads one panel at a time: its Scene's ``det`` is
that panel's block, and the other blocks are shared.  The derivatives of a P-panel model
hold the ``det`` fields once per panel, then the shared fields: a layout with
``panels = P`` has the offsets of panel 0, and :func:`panel_index` maps a kernel's
one-panel vector into it.  With one panel the two are the same.
"""

import functools
from typing import NamedTuple

import numpy as np


class Detector(NamedTuple):
    pix0: np.ndarray          # (3,) position of the first pixel's corner (m)
    fdet: np.ndarray          # (3,) fast axis
    sdet: np.ndarray          # (3,) slow axis
    odet: np.ndarray          # (3,) normal (sensor depth direction)
    pixel: float              # pixel size (m)
    subpixel: float           # pixel / oversample
    distance: float           # along the beam (curved detector radius)
    close_distance: float     # along the normal (solid angle)
    thick: float              # sensor thickness (0: no sensor layers)
    thickstep: float          # layer spacing (m)
    mu: float                 # attenuation (1/m)
    thicksteps: int
    oversample: int
    curved: bool
    point_pixel: bool
    fpixels: int
    spixels: int
    roi: np.ndarray           # int64 (4,): xmin, xmax, ymin, ymax, inclusive
    mask: np.ndarray          # uint8 (spixels, fpixels), or (1, 1) when unused
    use_mask: bool


class Beam(NamedTuple):
    beam: np.ndarray          # (3,) unit vector along the beam (curved detector)
    polar_axis: np.ndarray    # (3,) E-vector axis
    kahn: float               # Kahn polarization factor
    nopolar: bool
    sources: np.ndarray       # (n, 3) unit vectors toward the sources
    lambdas: np.ndarray       # (n,) wavelengths (m)
    weights: np.ndarray       # (n,) each source's weight (1: nanoBragg.c ignores weights)


class Crystal(NamedTuple):
    orients: np.ndarray       # (m, 3, 3) rows a, b, c (m)
    recip: np.ndarray         # (3, 3) rows a*, b*, c* (1/A): the spot-shape metric
    Na: float
    Nb: float
    Nc: float
    N_ab: float               # the Gaussian domain's off-diagonal size terms (shape DOMAIN)
    N_ac: float
    N_bc: float
    fudge: float
    shape: int                # physics.SQUARE, ROUND, GAUSS, TOPHAT or DOMAIN


class Structure(NamedTuple):
    grid: np.ndarray          # (nh, nk, nl) structure factors; (1, 1, 1) when there is none
    hkl_min: np.ndarray       # int64 (3,)
    hkl_max: np.ndarray       # int64 (3,)
    has_hkls: bool
    interpolate: bool
    default_F: float
    B: float                  # overall B factor (m^2; 0: none)
    beta: np.ndarray          # (6,) anisotropic displacements: F exp(-h^T beta h), (b11 b22 b33 b12 b13 b23)
    aniso: bool               # beta is in use


class Sampling(NamedTuple):
    os_omega: bool            # -oversample_omega
    os_polar: bool            # -oversample_polar
    os_thick: bool            # -oversample_thick
    physical: bool            # Experiment.physics "physical": the factors multiply each term, not the sum
    dmin: float               # m; 0 = no cut
    I_bg: float               # water background added to every pixel's sum
    water: bool
    bragg: bool               # False: no structure factor anywhere, the Bragg blocks are skipped
    bg_stol: np.ndarray       # amorphous tables, stol (1/m) (see physics.amorphous_F)
    bg_F: np.ndarray          # and F, concatenated over materials
    bg_start: np.ndarray      # int64 (materials + 1,): where each material's rows start
    bg_amount: np.ndarray     # (materials,) molecules x scale x domains x phisteps


class Scene(NamedTuple):
    det: Detector
    beam: Beam
    xtal: Crystal
    fhkl: Structure
    samp: Sampling


# the differentiable fields of each block, in layout order; "scale" is the factor
# r_e^2 fluence / steps that the engine applies after the kernel
DIFF = (
    ("det", ("pix0", "fdet", "sdet", "odet", "pixel", "subpixel", "distance", "close_distance", "thickstep",
             "mu")),
    ("beam", ("beam", "polar_axis", "kahn", "sources", "lambdas", "weights")),
    ("xtal", ("orients", "recip", "Na", "Nb", "Nc", "N_ab", "N_ac", "N_bc", "fudge")),
    ("fhkl", ("default_F", "B", "beta")),
    ("samp", ("I_bg", "bg_amount")),
)
FIELDS = tuple(f for _, names in DIFF for f in names) + ("scale",)


# Offsets of every differentiable field in a flat derivative vector (one int per field of
# FIELDS, made from DIFF so that a new input is listed once), then:
#   npad      orientations padded to a multiple of 8
#   size      entries in all
#   panels    detector panels (the det fields repeat once per panel)
#   det_size  entries of one panel's det fields
Layout = NamedTuple("Layout", [(f, int) for f in FIELDS] + [("npad", int), ("size", int), ("panels", int),
                                                           ("det_size", int)])


def padded(n):
    """n rounded up to a multiple of 8 (the orientation loops' vector layout)."""
    return (n + 7) // 8 * 8


def _field_size(scene, block, name, npad):
    if (block, name) == ("xtal", "orients"):
        return 9 * npad
    return int(np.size(getattr(getattr(scene, block), name)))


DET_FIELDS = DIFF[0][1]


def layout_of(scene, panels=1):
    """The :class:`Layout` of the derivatives of a scene (one panel's ``det`` block, as a
    kernel reads it) on a detector of ``panels`` such panels."""
    npad = padded(scene.xtal.orients.shape[0])
    offsets = {}
    at = 0
    det_size = 0
    for block, names in DIFF:
        if block != "det" and det_size == 0:
            det_size = at
            at = panels * det_size
        for name in names:
            offsets[name] = at
            at += _field_size(scene, block, name, npad)
    offsets["scale"] = at
    return Layout(**offsets, npad=npad, size=at + 1, panels=panels, det_size=det_size)


def kernel_layout(layout):
    """The one-panel layout the kernels read, for a layout of any number of panels."""
    if layout.panels == 1:
        return layout
    shift = (layout.panels - 1) * layout.det_size
    return layout._replace(**{f: getattr(layout, f) - shift for f in FIELDS if f not in DET_FIELDS},
                           size=layout.size - shift, panels=1)


def panel_index(layout, p):
    """Where the entries of a kernel's one-panel vector for panel ``p`` lie in a vector of
    ``layout`` (an index array of the kernel layout's size)."""
    k = kernel_layout(layout)
    idx = np.arange(k.size)
    det = idx < layout.det_size
    idx[det] += p * layout.det_size
    idx[~det] += (layout.panels - 1) * layout.det_size
    return idx


def field_slice(layout, name, panel=0):
    """The slice of ``name`` in a flat derivative vector (for a det field, the one of
    ``panel``)."""
    found = _field_slices(layout).get((name, panel if name in DET_FIELDS else 0))
    return found if found is not None else _field_slice(layout, name, panel)


@functools.lru_cache(maxsize=64)
def _field_slices(layout):
    """{(field, panel): slice} of a layout (panel 0 only for fields outside ``det``)."""
    return {(name, p): _field_slice(layout, name, p)
            for name in FIELDS for p in (range(layout.panels) if name in DET_FIELDS else (0,))}


def _field_slice(layout, name, panel):
    start = getattr(layout, name)
    if name in DET_FIELDS:
        i = DET_FIELDS.index(name)
        stop = getattr(layout, DET_FIELDS[i + 1]) if i + 1 < len(DET_FIELDS) else layout.det_size
        return slice(start + panel * layout.det_size, stop + panel * layout.det_size)
    i = FIELDS.index(name)
    stop = getattr(layout, FIELDS[i + 1]) if i + 1 < len(FIELDS) else layout.size
    return slice(start, stop)


def orients_to_soa(a, npad):
    """(..., m, 3, 3) -> (..., 9 * npad): the layout of orientation derivatives."""
    a = np.asarray(a, dtype=np.float64)
    m = a.shape[-3]
    lead = a.shape[:-3]
    out = np.zeros(lead + (9, npad))
    out[..., :m] = np.moveaxis(a.reshape(lead + (m, 9)), -1, -2)
    return out.reshape(lead + (9 * npad,))


def soa_to_orients(v, layout, m):
    """Inverse of :func:`orients_to_soa` for one vector: (m, 3, 3)."""
    seg = np.asarray(v)[field_slice(layout, "orients")].reshape(9, layout.npad)[:, :m]
    return seg.T.reshape(m, 3, 3)


def flatten(layout, values):
    """A flat derivative vector from {field name: array or number}; fields not given are 0.
    Orientations are given as (m, 3, 3); det fields with a leading panel axis (which may be
    left out with one panel)."""
    out = np.zeros(layout.size)
    for name, v in values.items():
        if name == "orients":
            v = orients_to_soa(v, layout.npad)
        if name in DET_FIELDS:
            v = np.reshape(v, (layout.panels, -1))
            for p in range(layout.panels):
                out[field_slice(layout, name, p)] = v[p]
        else:
            out[field_slice(layout, name)] = np.ravel(v)
    return out


def roi_clipped(det):
    """(xmin, xmax, ymin, ymax): the ROI inside the detector."""
    xmin, xmax, ymin, ymax = (int(v) for v in det.roi)
    return max(xmin, 0), min(xmax, det.fpixels - 1), max(ymin, 0), min(ymax, det.spixels - 1)


def as_single(scene):
    """The scene with every float in float32 (the inputs of the single-precision twins)."""
    def conv(block):
        vals = []
        for v in block:
            if isinstance(v, np.ndarray) and v.dtype == np.float64:
                v = v.astype(np.float32)
            elif type(v) is float:
                v = np.float32(v)
            vals.append(v)
        return type(block)(*vals)
    return Scene(*(conv(b) for b in scene))
