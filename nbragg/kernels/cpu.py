"""CPU kernels (Numba, parallel over detector rows).

The forward kernel computes, for every pixel inside the ROI and the mask, nanoBragg's
accumulated intensity times the solid-angle, polarization and absorption factors.  The
engine multiplies by r_e^2 * fluence / steps.  Each pixel is computed by one thread
from start to end, so the image does not depend on the number of threads.

The kernels read a :class:`~nbragg.kernels.scene.Scene`: named blocks of SI values.
"""


import numpy as np
from .. import _jitcache  # noqa: F401  (nbragg's cache keys, before any cached function)
from numba import njit, prange

from .physics import (REAL, SQUARE, amorphous_lanes, amorphous_stol, amorphous_weight, axes_hkl, beyond_dmin,
                      bragg_weight, capture_fraction, flat_grid_index, flat_position, grid_cells, grid_extent,
                      lattice_factor, lookup_F, miller, node_offset, orientation_axes, orientations_soa,
                      pixel_solid_angle, polarization_axes, polarization_with_axes, real, soa_miller, square_lattice_sq,
                      subpixel_position, sum_fixed, unit_direction, weighted)
from .pixel import add_term, apply_final, rebound, specialise
from .scene import Scene

@njit(cache=True, error_model="numpy", inline="always")
def square_terms(qx, qy, qz, ori, xt, fs, fflat, buf, ibuf):
    """F_cell^2 F_latt^2 for every orientation (parallelepiped shape, nearest F).

    The first loop has no calls, gathers or early exits, so LLVM vectorises it; the
    structure-factor gather, when there is a grid, runs in a second (scalar) loop.
    ``ori`` is (9, m8): rows a_x a_y a_z b_x ... c_z, zero-padded (see
    :func:`orientations_soa`); ``fflat`` the flattened grid.  Entries past the real
    orientations hold garbage and must be ignored.
    """
    n = ori.shape[1]
    use_grid = fs.has_hkls
    extent = grid_extent(fs)
    Na = xt.Na
    Nb = xt.Nb
    Nc = xt.Nc
    for m in range(n):
        h, k, l, h0, k0, l0 = soa_miller(ori, m, qx, qy, qz)
        buf[m] = square_lattice_sq(h - real(h0), k - real(k0), l - real(l0), Na, Nb, Nc)
        if use_grid:
            ibuf[m] = flat_grid_index(h0, k0, l0, extent)
    Fdef2 = fs.default_F * fs.default_F
    if use_grid:
        for m in range(n):
            j = ibuf[m]
            if j >= 0:
                F = fflat[j]
                buf[m] *= F * F
            else:
                buf[m] *= Fdef2
    else:
        for m in range(n):
            buf[m] *= Fdef2


@njit(cache=True, error_model="numpy", inline="always")
def term(orients, o, qx, qy, qz, S, s):
    """One orientation's sample for source ``s``: (h, k, l, h0, k0, l0, F_latt, F_cell,
    counted, T) with the term T = w F_cell^2 F_latt^2 (w the source's weight times the
    Debye-Waller factor: physics.bragg_weight).
    nanoBragg skips the structure-factor lookup, and the term, where F_latt is 0 (unless
    there is water background): then F_cell and T are 0 and counted is False."""
    h, k, l, h0, k0, l0 = miller(orients, o, qx, qy, qz)
    F_latt = lattice_factor(h, k, l, h0, k0, l0, S.xtal)
    if F_latt == 0.0 and not S.samp.water:
        return h, k, l, h0, k0, l0, F_latt, 0.0, False, 0.0
    F_cell = lookup_F(h, k, l, h0, k0, l0, S.fhkl)
    T = bragg_weight(S, s, qx, qy, qz) * (F_cell * F_cell * F_latt * F_latt)
    return h, k, l, h0, k0, l0, F_latt, F_cell, True, T


# the forward walk's terms with the lattice factor and the F lookup inlined: a call per
# term passes the scene's blocks by value (round spots with 20 domains ran 2.2x slower);
# the derivative modes keep the calls, which compile faster
forward_term = rebound(term, "inlined", {c.py_func.__name__: njit(cache=True, error_model="numpy", inline="always")(
    c.py_func) for c in (lattice_factor, lookup_F)})


@njit(cache=True, error_model="numpy", inline="always")
def _forward_block(W, S, I, qx, qy, qz, capture, polar, omega, t, subS, subF, s, sub):
    """The sum of one block's terms, added to I; with -oversample_* flags each term's
    running sum is multiplied by the factors, one by one, as the C does."""
    xt = S.xtal
    orients = xt.orients
    norient = orients.shape[0]
    if W[0]:      # W = (fast, ori, fflat, buf, ibuf), read by index (see pixel.py)
        buf = W[3]
        square_terms(qx, qy, qz, W[1], xt, S.fhkl, W[2], buf, W[4])
        return I + bragg_weight(S, s, qx, qy, qz) * sum_fixed(buf, norient)
    for m in range(norient):
        h, k, l, h0, k0, l0, F_latt, F_cell, counted, T = forward_term(orients, m, qx, qy, qz, S, s)
        if counted:
            I = add_term(I, T, S.samp, capture, polar, omega)
    return I


@njit(cache=True, error_model="numpy", inline="always")
def _forward_finish(W, S, I, capture, polar, omega, omega_sum, bg):
    return apply_final(S.samp, I, capture, polar, omega) + bg, omega_sum


walk_forward = specialise("forward", block=_forward_block, finish=_forward_finish)


@njit(cache=True, error_model="numpy", inline="always")
def pixel_value(fpixel, spixel, S, fast, ori, fflat, buf, ibuf):
    """One pixel: returns (value before r_e^2*fluence/steps, sum of sub-pixel omegas).

    ``fast`` (see :func:`fast_path`) sums each block's orientations in bulk with
    :func:`square_terms` (CPU vector loops over ``ori``, ``buf``, ``ibuf``); otherwise
    they are summed one by one, as the GPU does.  The pixel's sum starts as
    np.float64(I_bg), which single-precision twins keep: long sums keep their digits in
    float64 there too."""
    return walk_forward(fpixel, spixel, S, (fast, ori, fflat, buf, ibuf))


@njit(cache=True)
def fast_path(S):
    """True when the kernels may use the bulk orientation loops (no -oversample_* flags,
    parallelepiped spots, nearest-neighbour F without anisotropic displacements)."""
    return (not S.samp.os_omega and not S.samp.os_polar and not S.samp.os_thick
            and S.xtal.shape == SQUARE and not S.fhkl.interpolate and not S.fhkl.aniso)


@njit(cache=True)
def clipped_roi(det, spixels, fpixels):
    """(xmin, xmax, ymin, ymax) of the ROI inside an image of that size."""
    return (max(det.roi[0], 0), min(det.roi[1], fpixels - 1), max(det.roi[2], 0), min(det.roi[3], spixels - 1))


@njit(cache=True)
def forward_row_path(S):
    """True when the forward kernel computes rows in vector loops across their pixels
    (:func:`_forward_row_lanes`): the bulk-orientation case (:func:`fast_path`), with or
    without an amorphous background, and any image without Bragg terms (nonBragg's)."""
    return fast_path(S) or not S.samp.bragg


@njit(cache=True)
def derivative_row_path(S):
    """True when the tangent and the adjoint compute rows in vector loops across their
    pixels (``tangent._tangent_row_lanes``, ``adjoint._adjoint_row_lanes``): the
    bulk-orientation case with Bragg terms, with or without an amorphous background."""
    return fast_path(S) and S.samp.bragg


@njit(parallel=True, cache=True, error_model="numpy")
def forward(det, beam, xtal, fhkl, samp, y0, y1, image, omega_rows, lanes):
    """Fill ``image`` (spixels, fpixels) inside ROI and mask, in rows y0..y1 (inclusive,
    within the ROI's); other pixels are left as they are.  ``lanes``: rows take
    :func:`_forward_row_lanes` where :func:`forward_row_path` allows (False: every pixel walks, as
    the tests' reference does).

    Parallel kernels take the scene's blocks one by one (``*scene``) and rebuild the
    Scene inside the parallel loop: Numba's parallel loops cannot take nested tuples of
    arrays from outside."""
    spixels, fpixels = image.shape
    xmin, xmax, ymin, ymax = clipped_roi(det, spixels, fpixels)
    ymin = max(ymin, y0)
    ymax = min(ymax, y1)
    ori = orientations_soa(xtal.orients)
    fflat = fhkl.grid.ravel()
    fast = fast_path(Scene(det, beam, xtal, fhkl, samp))
    lanes = lanes and forward_row_path(Scene(det, beam, xtal, fhkl, samp))
    for spixel in prange(ymin, ymax + 1):
        if lanes:
            _forward_row_lanes(Scene(det, beam, xtal, fhkl, samp), spixel, xmin, xmax, ori, fflat, image,
                               omega_rows)
        else:
            _forward_row(Scene(det, beam, xtal, fhkl, samp), spixel, xmin, xmax, fast, ori, fflat, image,
                         omega_rows)


@njit(cache=True, error_model="numpy", inline="always")
def _forward_row(S, spixel, xmin, xmax, fast, ori, fflat, image, omega_rows):
    """One row of the forward kernel.  (A call per row from the parallel loop: the pixel
    walk is inlined here, where Numba keeps writes into arrays held in tuples, which it
    may lose when they are inlined into the parallel loop's body itself.)"""
    use_mask = S.det.use_mask
    mask = S.det.mask
    buf = np.empty(ori.shape[1], dtype=REAL)
    ibuf = np.empty(ori.shape[1], dtype=np.int64)
    osum = 0.0
    for fpixel in range(xmin, xmax + 1):
        if use_mask and mask[spixel, fpixel] == 0:
            continue
        v, o = pixel_value(fpixel, spixel, S, fast, ori, fflat, buf, ibuf)
        image[spixel, fpixel] = v
        osum += o
    omega_rows[spixel] = osum


@njit(cache=True, error_model="numpy")
def _forward_row_lanes(S, spixel, xmin, xmax, ori, fflat, image, omega_rows):
    """One row of the forward kernel in the :func:`forward_row_path` case, the pixels of
    the row as vector lanes: the loops over them make no calls (the structure-factor
    gather, the curved detector's and the sensor layers' trigonometry and the amorphous
    background's table run in loops of their own), so LLVM vectorises them, and cheap
    images (few orientations per pixel) pay no padding.

    It is :func:`~nbragg.kernels.pixel.walk` with the ``forward`` mode, sample loop
    outside and pixel loop inside, and gives the same values bit for bit (the tests
    compare the two): the solid angle taken at the first sub-pixel, the capture fraction
    at each layer's first, the polarization at the first sample -dmin keeps, each block's
    orientations summed in :func:`sum_fixed`'s order, and the amorphous background's
    factors taken at every sample (nonBragg's), summed apart and added at the end."""
    det = S.det
    beam = S.beam
    xt = S.xtal
    fs = S.fhkl
    samp = S.samp
    n = xmax - xmin + 1
    if n <= 0:
        omega_rows[spixel] = 0.0
        return
    os = det.oversample
    norient = xt.orients.shape[0]
    n8 = norient // 8 * 8
    Na = xt.Na
    Nb = xt.Nb
    Nc = xt.Nc
    use_grid = fs.has_hkls
    extent = grid_extent(fs)
    Fdef2 = fs.default_F * fs.default_F
    kahn = beam.kahn
    pv = beam.polar_axis
    sources = beam.sources
    lambdas = beam.lambdas
    nsrc = sources.shape[0]
    dmin = samp.dmin
    debye = fs.B != 0.0
    bragg = samp.bragg
    nopolar = beam.nopolar
    nbg = samp.bg_amount.shape[0]
    sensor = det.thick != 0.0
    # -oversample_omega and -oversample_thick (here only without Bragg terms: fast_path)
    # take the solid angle and the capture fraction again at every sub-pixel, as the walk
    os_omega = samp.os_omega
    every_capture = samp.os_thick and (sensor or not samp.physical)
    # (loops over the pixels pass scalars, not the scene's blocks: see physics.pixel_solid_angle)
    pixel = det.pixel
    close_distance = det.close_distance
    point_pixel = det.point_pixel
    I = np.empty(n, dtype=np.float64)         # np.float64: the sum stays float64 in twins
    omega = np.zeros(n, dtype=REAL)
    omega_sum = np.zeros(n, dtype=REAL)
    capture = np.empty(n, dtype=REAL)
    polar = np.empty(n, dtype=REAL)
    dx = np.empty(n, dtype=REAL)
    dy = np.empty(n, dtype=REAL)
    dz = np.empty(n, dtype=REAL)
    keep = np.empty(n, dtype=np.bool_)
    weight = np.empty(n, dtype=REAL)
    acc = np.empty((8, n), dtype=REAL)
    latt = np.empty(n, dtype=REAL)
    cell = np.empty(n, dtype=np.int64)
    R = np.empty(n, dtype=REAL)
    qxs = np.empty(n, dtype=REAL)
    qys = np.empty(n, dtype=REAL)
    qzs = np.empty(n, dtype=REAL)
    bg = np.zeros(n, dtype=np.float64)        # the amorphous background's sum, as the walk's
    bg_omega = np.empty(n if nbg > 0 else 0, dtype=REAL)
    bg_capture = np.ones(n if nbg > 0 else 0, dtype=REAL)
    bg_weight = np.empty(n if nbg > 0 else 0, dtype=REAL)
    stol = np.empty(n if nbg > 0 else 0, dtype=REAL)
    redo = np.empty(n if nbg > 0 else 0, dtype=np.bool_)
    polar0 = 1.0 if beam.nopolar else 0.0
    for p in range(n):
        I[p] = S.samp.I_bg
        polar[p] = polar0
    for t in range(det.thicksteps):
        capture0 = 1.0 if det.thick == 0.0 else 0.0
        for p in range(n):
            capture[p] = capture0
        for subS in range(os):
            for subF in range(os):
                lane_directions(det, beam, spixel, xmin, n, subF, subS, t, R, dx, dy, dz)
                for p in range(n):
                    if omega[p] == 0.0 or os_omega:
                        omega[p] = pixel_solid_angle(R[p], pixel, close_distance, point_pixel)
                    omega_sum[p] += omega[p]
                if nbg > 0:
                    lane_background_factors(det, t, n, R, dx, dy, dz, bg_omega, bg_capture)
                if capture0 == 0.0 or every_capture:
                    # (exp: a scalar loop, run only with sensor layers; with a background it
                    # has taken the same fraction at this sub-pixel)
                    for p in range(n):
                        if capture[p] == 0.0 or every_capture:
                            if nbg > 0 and sensor:
                                capture[p] = bg_capture[p]
                            else:
                                capture[p] = capture_fraction(t, dx[p], dy[p], dz[p], det)
                for s in range(nsrc):
                    ix = -sources[s, 0]
                    iy = -sources[s, 1]
                    iz = -sources[s, 2]
                    lam = lambdas[s]
                    bx, by, bz, ex, ey, ez = polarization_axes(kahn, ix, iy, iz, pv[0], pv[1], pv[2])
                    w = S.beam.weights[s]
                    for p in range(n):
                        qx = (dx[p] - ix) / lam
                        qy = (dy[p] - iy) / lam
                        qz = (dz[p] - iz) / lam
                        qxs[p] = qx
                        qys[p] = qy
                        qzs[p] = qz
                        kept = not beyond_dmin(qx, qy, qz, dmin)
                        keep[p] = kept
                        if bragg and kept and polar[p] == 0.0:
                            polar[p] = polarization_with_axes(kahn, ix, iy, iz, dx[p], dy[p], dz[p],
                                                              bx, by, bz, ex, ey, ez)
                    if nbg > 0:
                        # the walk's amorphous_term, its factors and its tables' sums in loops of
                        # their own
                        for p in range(n):
                            bg_weight[p] = amorphous_weight(nopolar, kahn, ix, iy, iz, dx[p], dy[p], dz[p], bx, by, bz,
                                                            ex, ey, ez, bg_omega[p], w, bg_capture[p])
                            stol[p] = amorphous_stol(qxs[p], qys[p], qzs[p])
                        amorphous_lanes(samp, stol, bg_weight, bg, redo, n)
                    if not bragg:
                        continue
                    # (weight is written even without B: the sum's loop below loads it under a
                    # mask, and a masked load from a page never touched is a microcode assist
                    # per vector on some CPUs, which made a still's rows 2-3x slower)
                    if debye:
                        for p in range(n):
                            weight[p] = weighted(w, fs.B, qxs[p], qys[p], qzs[p])
                    else:
                        for p in range(n):
                            weight[p] = w
                    acc[:, :] = 0.0
                    for m in range(norient):
                        _lattice_lanes(ori, m, qxs, qys, qzs, Na, Nb, Nc, latt, cell, use_grid, extent, n)
                        j = m & 7 if m < n8 else 0
                        if use_grid:
                            for p in range(n):
                                c = cell[p]
                                F2 = Fdef2
                                if c >= 0:
                                    F = fflat[c]
                                    F2 = F * F
                                acc[j, p] += latt[p] * F2
                        else:
                            for p in range(n):
                                acc[j, p] += latt[p] * Fdef2
                    for p in range(n):
                        if keep[p]:
                            I[p] += weight[p] * block_total(acc, p)
    use_mask = det.use_mask
    mask = det.mask
    osum = 0.0
    for p in range(n):
        fpixel = xmin + p
        if use_mask and mask[spixel, fpixel] == 0:
            continue
        # (+ bg: the walk's finish; without a background 0, which makes -0.0 +0.0 there too)
        image[spixel, fpixel] = apply_final(samp, I[p], capture[p], polar[p], omega[p]) + bg[p]
        osum += omega_sum[p]
    omega_rows[spixel] = osum


@njit(cache=True, error_model="numpy", inline="always")
def lane_background_factors(det, t, n, R, dx, dy, dz, bg_omega, bg_capture):
    """The amorphous term's solid angle and capture fraction of n lanes at a sample, taken
    at every sample as the walk's bg_omega and bg_capture (bg_capture left as it is, 1,
    without a sensor)."""
    pixel = det.pixel
    close_distance = det.close_distance
    point_pixel = det.point_pixel
    for p in range(n):
        bg_omega[p] = pixel_solid_angle(R[p], pixel, close_distance, point_pixel)
    if det.thick != 0.0:
        for p in range(n):
            bg_capture[p] = capture_fraction(t, dx[p], dy[p], dz[p], det)


@njit(cache=True, error_model="numpy", inline="always")
def lane_directions(det, beam, spixel, xmin, n, subF, subS, t, R, dx, dy, dz):
    """Distance R and unit direction d of sub-pixel (subF, subS) in layer t of the n
    pixels xmin.. of row spixel."""
    if det.curved:
        # (sin and cos: a scalar loop)
        for p in range(n):
            px, py, pz = subpixel_position(xmin + p, spixel, subF, subS, t, det, beam)
            R[p] = _unit_lane(px, py, pz, dx, dy, dz, p)
    else:
        for p in range(n):
            px, py, pz = flat_position(xmin + p, spixel, subF, subS, t, det)
            R[p] = _unit_lane(px, py, pz, dx, dy, dz, p)


# doubles of per-orientation partials (9 x orientations x pixels) that a chunk of a row's
# lanes keeps in the tangent's row lanes: within a core's cache
LANE_PARTIALS = 1 << 15


@njit(cache=True, error_model="numpy")
def lane_chunk(width, norient):
    """How many of a row's pixels the tangent takes as lanes at once: what keeps its
    orientation partials within LANE_PARTIALS (at least 16 lanes, however many
    orientations), rounded down to a multiple of 16 so that the vector loops (four lanes,
    unrolled four times) leave no scalar remainder but at the row's end."""
    cap = LANE_PARTIALS // (9 * max(norient, 1)) // 16 * 16
    return max(1, min(width, max(16, cap)))


@njit(cache=True, error_model="numpy", inline="always")
def block_total(acc, p):
    """Lane p's block sum from its eight partial sums acc[:, p], in :func:`sum_fixed`'s
    order (orientation m went to acc[m % 8] below the last multiple of 8, else acc[0])."""
    return ((acc[0, p] + acc[1, p]) + (acc[2, p] + acc[3, p])) + ((acc[4, p] + acc[5, p]) + (acc[6, p] + acc[7, p]))


@njit(cache=True, error_model="numpy", inline="always")
def _unit_lane(px, py, pz, dx, dy, dz, p):
    """Stores lane p's unit direction; returns its distance."""
    _, _, _, R, ux, uy, uz = unit_direction(px, py, pz)
    dx[p] = ux
    dy[p] = uy
    dz[p] = uz
    return R


@njit(cache=True, error_model="numpy", inline="always")
def _lattice_lanes(ori, m, qx, qy, qz, Na, Nb, Nc, latt, cell, use_grid, extent, n):
    """latt[p] = F_latt^2 of orientation m at q[p] for p < n (and, with a grid, cell[p]:
    the nearest node's index in it, or -1): :func:`square_terms`'s arithmetic, one
    orientation across pixels."""
    A = orientation_axes(ori, m)
    for p in range(n):
        h, k, l = axes_hkl(A, qx[p], qy[p], qz[p])
        latt[p] = square_lattice_sq(node_offset(h), node_offset(k), node_offset(l), Na, Nb, Nc)
    if use_grid:
        grid_cells(ori, m, qx, qy, qz, extent, cell, n)
