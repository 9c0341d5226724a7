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
"""

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


class Crystal(NamedTuple):
    orients: np.ndarray       # (m, 3, 3) rows a, b, c (m)
    recip: np.ndarray         # (3, 3) rows a*, b*, c* (1/A): the spot-shape metric
    Na: float
    Nb: float
    Nc: float
    fudge: float
    shape: int                # physics.SQUARE, ROUND, GAUSS or TOPHAT


class Structure(NamedTuple):
    grid: np.ndarray          # (nh, nk, nl) structure factors; (1, 1, 1) when there is none
    hkl_min: np.ndarray       # int64 (3,)
    hkl_max: np.ndarray       # int64 (3,)
    has_hkls: bool
    interpolate: bool
    default_F: float


class Sampling(NamedTuple):
    os_omega: bool            # -oversample_omega
    os_polar: bool            # -oversample_polar
    os_thick: bool            # -oversample_thick
    dmin: float               # m; 0 = no cut
    I_bg: float               # water background added to every pixel's sum
    water: bool


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
    ("beam", ("beam", "polar_axis", "kahn", "sources", "lambdas")),
    ("xtal", ("orients", "recip", "Na", "Nb", "Nc", "fudge")),
    ("fhkl", ("default_F",)),
    ("samp", ("I_bg",)),
)
FIELDS = tuple(f for _, names in DIFF for f in names) + ("scale",)


class Layout(NamedTuple):
    """Offsets of every differentiable field in a flat derivative vector."""
    pix0: int
    fdet: int
    sdet: int
    odet: int
    pixel: int
    subpixel: int
    distance: int
    close_distance: int
    thickstep: int
    mu: int
    beam: int
    polar_axis: int
    kahn: int
    sources: int
    lambdas: int
    orients: int
    recip: int
    Na: int
    Nb: int
    Nc: int
    fudge: int
    default_F: int
    I_bg: int
    scale: int
    npad: int                 # orientations padded to a multiple of 8
    size: int


assert Layout._fields[:len(FIELDS)] == FIELDS


def padded(n):
    """n rounded up to a multiple of 8 (the orientation loops' vector layout)."""
    return (n + 7) // 8 * 8


def _field_size(scene, block, name, npad):
    if (block, name) == ("xtal", "orients"):
        return 9 * npad
    return int(np.size(getattr(getattr(scene, block), name)))


def layout_of(scene):
    """The :class:`Layout` of a scene's derivatives."""
    npad = padded(scene.xtal.orients.shape[0])
    offsets = {}
    at = 0
    for block, names in DIFF:
        for name in names:
            offsets[name] = at
            at += _field_size(scene, block, name, npad)
    offsets["scale"] = at
    return Layout(**offsets, npad=npad, size=at + 1)


def field_slice(layout, name):
    """The slice of ``name`` in a flat derivative vector."""
    i = FIELDS.index(name)
    start = getattr(layout, name)
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
    Orientations are given as (m, 3, 3)."""
    out = np.zeros(layout.size)
    for name, v in values.items():
        if name == "orients":
            v = orients_to_soa(v, layout.npad)
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
