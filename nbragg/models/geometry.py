"""Small vector helpers with nanoBragg.c's exact conventions."""

import math

import numpy as np


def rotate_xyz(v, phix, phiy, phiz):
    """Rotate ``v`` about x, then y, then z (radians); zero angles are skipped as in the C."""
    x, y, z = (float(c) for c in v)
    if phix != 0:
        c, s = math.cos(phix), math.sin(phix)
        y, z = y * c + z * (-s), y * s + z * c
    if phiy != 0:
        c, s = math.cos(phiy), math.sin(phiy)
        x, z = x * c + z * s, x * (-s) + z * c
    if phiz != 0:
        c, s = math.cos(phiz), math.sin(phiz)
        x, y = x * c + y * (-s), x * s + y * c
    return np.array([x, y, z])


def rotation_xyz_matrix(phix, phiy, phiz):
    """The matrix of :func:`rotate_xyz`: Rz @ Ry @ Rx."""
    return np.column_stack([rotate_xyz(e, phix, phiy, phiz) for e in np.eye(3)])


def rotate_axis(v, axis, phi):
    """Rotate ``v`` by ``phi`` radians about the unit vector ``axis`` (Rodrigues, C order)."""
    s = math.sin(phi)
    c = math.cos(phi)
    ax, ay, az = (float(t) for t in axis)
    vx, vy, vz = (float(t) for t in v)
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
    v = np.asarray(v, dtype=float)
    mag = math.sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2])
    if mag != 0.0:
        return v / mag, mag
    return np.zeros(3), 0.0


def cross(a, b):
    return np.array([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]])


def dot(a, b):
    return float(a[0] * b[0] + a[1] * b[1] + a[2] * b[2])
