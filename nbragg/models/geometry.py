"""Small vector helpers with nanoBragg.c's exact conventions.

The set-up code also runs on complex numbers: the derivatives of the kernel inputs come
from one complex-step pass through it (params.py).  So these helpers take real or complex
scalars; a real value goes through :mod:`math` exactly as before, a complex one through
:mod:`cmath`, and comparisons look at the real part (:func:`re`).
"""

import cmath
import math

import numpy as np


def re(x):
    """The real part of a real or complex scalar (what branches compare)."""
    return x.real if isinstance(x, complex) else x


def _fn(real_fn, complex_fn):
    def f(x):
        return complex_fn(x) if isinstance(x, complex) else real_fn(x)
    f.__name__ = real_fn.__name__
    return f


sin = _fn(math.sin, cmath.sin)
cos = _fn(math.cos, cmath.cos)
sqrt = _fn(math.sqrt, cmath.sqrt)


def absolute(x):
    """abs(x), continued analytically for a complex step: the sign follows the real part."""
    if isinstance(x, complex):
        return x if x.real >= 0.0 else -x
    return abs(x)


def scalar(x):
    """A NumPy or Python scalar as a Python float, or complex when it carries a step."""
    if isinstance(x, (float, np.floating)):        # (the common cases first: the set-up's
        return float(x)                              # derivative calls this thousands of times)
    if isinstance(x, (complex, np.complexfloating)):
        return complex(x)
    return complex(x) if np.iscomplexobj(x) else float(x)


def rotate_xyz(v, phix, phiy, phiz):
    """Rotate ``v`` about x, then y, then z (radians); zero angles are skipped as in the C."""
    x, y, z = (scalar(c) for c in v)
    if phix != 0:
        c, s = cos(phix), sin(phix)
        y, z = y * c + z * (-s), y * s + z * c
    if phiy != 0:
        c, s = cos(phiy), sin(phiy)
        x, z = x * c + z * s, x * (-s) + z * c
    if phiz != 0:
        c, s = cos(phiz), sin(phiz)
        x, y = x * c + y * (-s), x * s + y * c
    return np.array([x, y, z])


def rotation_xyz_matrix(phix, phiy, phiz):
    """The matrix of :func:`rotate_xyz`: Rz @ Ry @ Rx."""
    return np.column_stack([rotate_xyz(e, phix, phiy, phiz) for e in np.eye(3)])


def rotate_axis(v, axis, phi):
    """Rotate ``v`` by ``phi`` radians about the unit vector ``axis`` (Rodrigues, C order)."""
    s = sin(phi)
    c = cos(phi)
    ax, ay, az = (scalar(t) for t in axis)
    vx, vy, vz = (scalar(t) for t in v)
    dot = (ax * vx + ay * vy + az * vz) * (1.0 - c)
    return np.array([
        ax * dot + vx * c + (-az * vy + ay * vz) * s,
        ay * dot + vy * c + (+az * vx - ax * vz) * s,
        az * dot + vz * c + (-ay * vx + ax * vy) * s,
    ])


def axis_rotation_matrix(axis, phi):
    """The matrix of :func:`rotate_axis`."""
    return np.column_stack([rotate_axis(e, axis, phi) for e in np.eye(3)])


def unitize(v):
    """(unit vector, magnitude); the zero vector stays zero."""
    v = np.asarray(v)
    if not np.iscomplexobj(v):
        v = v.astype(float, copy=False)
    mag = sqrt(scalar(v[0] * v[0] + v[1] * v[1] + v[2] * v[2]))
    if mag != 0.0:
        return v / mag, mag
    return np.zeros(3), 0.0


def cross(a, b):
    return np.array([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]])


def dot(a, b):
    return scalar(a[0] * b[0] + a[1] * b[1] + a[2] * b[2])
