"""Structure factors from crystallographic files, read with gemmi.

nanoBragg looks structure factors up by Miller index over the whole reciprocal lattice,
so every reader here returns a P1 list of amplitudes: the file's reflections (usually an
asymmetric unit) expanded with every rotation of its space group, plus their Friedel
mates (-h -k -l takes the same amplitude: nanoBragg has no anomalous scattering).

* :func:`read_mtz` -- an MTZ file (CCP4 reflection format);
* :func:`read_mmcif_reflections` -- an mmCIF structure-factor file (a PDB ``r????sf.cif``);
* :func:`structure_factors_from_model` -- |F| computed from a PDB or mmCIF coordinate file.

Each returns a :class:`ReflectionData` (an :class:`~nbragg.io.hkl.HKLData` that also
carries the file's cell and space group), ready for ``to_grid``.  gemmi is imported only
when one of these is called (``pip install gemmi``, or the ``nbragg[crystallography]``
extra).  Mistakes in the files or arguments raise
:class:`~nbragg.errors.InputFileError` or :class:`~nbragg.errors.ParameterError` naming
the file, the column and the offending value.
"""

import math
import os
import warnings

import numpy as np

from ..errors import InputFileError, ParameterError
from .hkl import HKLData

# preferred amplitude columns when none is named, in order
MTZ_AMPLITUDE_NAMES = ("F", "FP", "F-obs", "FOBS", "F_meas", "F-obs-filtered", "FMEAS")
CIF_AMPLITUDE_NAMES = ("F_meas_au", "F_meas", "pdbx_F_plus", "pdbx_F_minus", "F_calc_au", "F_calc")
CIF_INTENSITY_NAMES = ("intensity_meas", "F_squared_meas", "pdbx_I_plus", "pdbx_I_minus",
                       "intensity_calc", "F_squared_calc")
MAX_GRID_POINTS = 2e8      # the dense HKL grid nanoBragg needs (as for HKL text files)
MAX_MAP_POINTS = 4e8       # the density map of structure_factors_from_model


class ReflectionData(HKLData):
    """P1 reflections (indices, amplitudes) with the file's ``cell`` (a, b, c, alpha,
    beta, gamma; Angstrom and degrees, or None), ``spacegroup`` (Hermann-Mauguin
    symbol) and ``column`` (the label read, or a note on how |F| was computed)."""

    def __init__(self, indices, amplitudes, source=None, cell=None, spacegroup=None, column=None):
        super().__init__(indices, amplitudes, source=source)
        self.cell = cell
        self.spacegroup = spacegroup
        self.column = column


def _gemmi(what, path):
    try:
        import gemmi
    except ImportError:
        raise InputFileError(
            f"{what} file {os.fspath(path)!r}: reading it needs the gemmi package "
            "(pip install gemmi, or pip install 'nbragg[crystallography]')") from None
    return gemmi


def _check_readable(path, what):
    """The errors open() would give, before gemmi sees the file (its messages vary)."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise InputFileError(f"{what} file {p!r} does not exist")
    if os.path.isdir(p):
        raise InputFileError(f"{what} file {p!r} is a directory")
    try:
        with open(p, "rb") as fh:
            head = fh.read(1)
    except OSError as exc:
        raise InputFileError(f"{what} file {p!r} cannot be read: {exc.strerror}") from None
    if not head:
        raise InputFileError(f"{what} file {p!r} is empty")
    return p


def _check_dmin(dmin, what, path, required=False):
    if dmin is None:
        if required:
            raise ParameterError(f"{what} file {path!r}: a resolution limit dmin (Angstrom) is required")
        return None
    try:
        d = float(dmin)
    except (TypeError, ValueError):
        raise ParameterError(f"{what} file {path!r}: dmin {dmin!r} is not a number") from None
    if not (math.isfinite(d) and d > 0):
        raise ParameterError(f"{what} file {path!r}: dmin {dmin!r} must be a positive number of Angstrom")
    return d


def _cell_tuple(cell):
    if cell is None or not cell.is_crystal():
        return None
    return (cell.a, cell.b, cell.c, cell.alpha, cell.beta, cell.gamma)


def _rotations(spacegroup):
    """The space group's rotation matrices as integers, acting on row vectors h' = h R
    (centring translations leave |F| alone, so the point-group part is all we need)."""
    den = 24   # gemmi.Op.DEN
    mats = []
    for op in spacegroup.operations().sym_ops:
        r = np.array(op.rot, dtype=np.int64)
        mats.append(r // den)
    return mats


def expand_to_p1(indices, amplitudes, rotations, where):
    """Apply every rotation (h' = h R) and Friedel's law to a reflection list.

    Copies of one reflection (from centric or special-position reflections, or a file
    that already lists equivalents) must carry the same amplitude; one is kept.
    Different amplitudes for equivalent indices (unmerged or anomalous data) are an
    :class:`InputFileError` naming ``where``.  Returns (indices, amplitudes), sorted.
    """
    hkl = np.asarray(indices, dtype=np.int64).reshape(-1, 3)
    amp = np.asarray(amplitudes, dtype=np.float64).reshape(-1)
    parts = []
    for r in rotations:
        h = hkl @ r
        parts.append(h)
        parts.append(-h)
    allh = np.concatenate(parts)
    alla = np.tile(amp, 2 * len(rotations))
    uniq, inverse = np.unique(allh, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    hi = np.full(len(uniq), -np.inf)
    lo = np.full(len(uniq), np.inf)
    np.maximum.at(hi, inverse, alla)
    np.minimum.at(lo, inverse, alla)
    # float32 storage in MTZ files: equal values stay equal, so a loose tolerance only
    # guards against text rounding, never hides genuinely different data
    bad = np.nonzero(hi - lo > 1e-4 * np.maximum(np.abs(hi), 1e-6))[0]
    if bad.size:
        i = bad[0]
        h, k, l = (int(x) for x in uniq[i])
        raise InputFileError(
            f"{where}: reflections equivalent to ({h} {k} {l}) under the space group's symmetry or "
            f"Friedel's law have different amplitudes ({lo[i]:g} and {hi[i]:g}); {bad.size} such "
            "reflection(s) in all. Merge the data first (nanoBragg needs one amplitude per reflection)")
    return uniq, hi


def _finish(hkl, amp, rotations, cell_obj, dmin, where, path, sg_name, column):
    """Drop missing values, cut at dmin, expand to P1 and check the grid size."""
    if len(amp) == 0:
        raise InputFileError(f"{where} holds no reflections")
    keep = np.isfinite(amp)
    if not keep.any():
        raise InputFileError(f"{where}: column {column!r} holds no values (all {len(amp)} missing)")
    hkl, amp = hkl[keep], amp[keep]
    if dmin is not None:
        if cell_obj is None or not cell_obj.is_crystal():
            raise InputFileError(f"{where}: the file has no unit cell, so the resolution cut dmin {dmin:g} A "
                                 "cannot be applied")
        inside = _within(cell_obj, hkl, dmin)
        if not inside.any():
            inv_d2 = np.asarray(cell_obj.calculate_1_d2_array(hkl.astype(np.int32)), dtype=np.float64)
            dbest = 1.0 / math.sqrt(inv_d2.min()) if inv_d2.min() > 0 else float("inf")
            raise InputFileError(f"{where}: no reflection reaches dmin {dmin:g} A (the lowest-resolution one "
                                 f"has d = {dbest:.4g} A)")
        hkl, amp = hkl[inside], amp[inside]
    uniq, vals = expand_to_p1(hkl, amp, rotations, where)
    lo = uniq.min(axis=0)
    hi = uniq.max(axis=0)
    npoints = float(np.prod((hi - lo + 1).astype(float)))
    if npoints > MAX_GRID_POINTS:
        raise InputFileError(
            f"{where}: index ranges {lo.tolist()}..{hi.tolist()} need a grid of {npoints:.3g} points; too large "
            "(cut the resolution with dmin)")
    return ReflectionData(uniq, vals, source=path, cell=_cell_tuple(cell_obj), spacegroup=sg_name, column=column)


def _amplitudes_from(values, label, is_intensity, where, warn):
    values = np.asarray(values, dtype=np.float64)
    if not is_intensity:
        neg = np.count_nonzero(values < 0)
        if neg:
            i = int(np.nonzero(values < 0)[0][0])
            raise InputFileError(f"{where}: column {label!r} holds {neg} negative amplitude(s), e.g. {values[i]:g} "
                                 f"(row {i + 1}); amplitudes must not be negative")
        return values
    neg = np.count_nonzero(values < 0)
    _warn(warn, f"{where}: column {label!r} holds intensities; amplitudes taken as sqrt(max(I, 0))"
          + (f" ({neg} negative intensities set to 0)" if neg else ""))
    with np.errstate(invalid="ignore"):
        return np.sqrt(np.where(values < 0, 0.0, values))   # NaN (missing) stays NaN


def _warn(warn, msg):
    if warn is not None:
        warn(msg)
    else:
        warnings.warn(msg, stacklevel=3)


# ----------------------------------------------------------------------------- MTZ

def read_mtz(path, column=None, dmin=None, warn=None):
    """Read amplitudes from an MTZ file and expand them to P1 (see the module notes).

    ``column``: the label of the amplitude column.  By default the first column of type
    F, preferring the common names F, FP, F-obs, FOBS, F_meas.  An intensity column
    (type J or K) is read only when named, as sqrt(max(I, 0)), with a warning.
    ``dmin``: keep reflections with d >= dmin (Angstrom; d from the file's cell).
    Missing values (NaN) are dropped.  ``warn(message)`` receives non-fatal remarks
    (default: Python warnings).
    """
    what = "MTZ"
    p = _check_readable(path, what)
    gemmi = _gemmi(what, p)
    dmin = _check_dmin(dmin, what, p)
    try:
        mtz = gemmi.read_mtz_file(p)
    except (RuntimeError, ValueError, OSError, IndexError) as exc:
        raise InputFileError(f"{what} file {p!r} is not a readable MTZ file: {exc}") from None
    where = f"{what} file {p!r}"
    labels = [c.label for c in mtz.columns]
    described = ", ".join(f"{c.label} ({c.type})" for c in mtz.columns)
    if column is None:
        ftype = [c.label for c in mtz.columns if c.type == "F"]
        preferred = [n for n in MTZ_AMPLITUDE_NAMES if n in ftype]
        if preferred:
            label = preferred[0]
        elif ftype:
            label = ftype[0]
        else:
            raise InputFileError(
                f"{where} has no amplitude column (type F); its columns: {described}. Name one with the column "
                "option (-column); an intensity column (type J) is read as sqrt(I)")
    else:
        label = str(column)
        if label not in labels:
            raise InputFileError(f"{where} has no column {label!r}; its columns: {described}")
    col = mtz.column_with_label(label)
    if col.type in ("F", "G"):
        is_intensity = False
    elif col.type in ("J", "K"):
        is_intensity = True
    else:
        raise InputFileError(
            f"{where}: column {label!r} has type {col.type}, not an amplitude (F, G) or an intensity (J, K); "
            f"its columns: {described}")
    if mtz.spacegroup is None:
        raise InputFileError(f"{where} has no space group the file's symmetry records can be read as "
                             f"({mtz.spacegroup_name!r})")
    if len(labels) < 3 or labels[:3] != ["H", "K", "L"]:
        raise InputFileError(f"{where}: the first three columns are {labels[:3]}, not H K L")
    if mtz.nreflections == 0:
        raise InputFileError(f"{where} holds no reflections")
    hkl = np.asarray(mtz.make_miller_array(), dtype=np.int64)
    if col.type == "G":
        _warn(warn, f"{where}: column {label!r} holds anomalous amplitudes (type G); its values are given to "
              "the Friedel mates too (nanoBragg has no anomalous scattering)")
    values = _amplitudes_from(np.array(col, dtype=np.float64), label, is_intensity, where, warn)
    cell = mtz.get_cell() if mtz.get_cell().is_crystal() else mtz.cell
    return _finish(hkl, values, _rotations(mtz.spacegroup), cell, dmin, where, p, mtz.spacegroup.hm, label)


# ----------------------------------------------------------------------------- mmCIF

def _cif_kind(label):
    """'F' (amplitude), 'I' (intensity) or None for an mmCIF _refln column."""
    if label in CIF_AMPLITUDE_NAMES:
        return "F"
    if label in CIF_INTENSITY_NAMES:
        return "I"
    low = label.lower()
    if "sigma" in low or "phase" in low:
        return None
    if low.startswith(("intensity", "f_squared", "pdbx_i_")):
        return "I"
    if low.startswith(("f_", "pdbx_f_")) or low.endswith("fwt"):
        return "F"
    return None


def read_mmcif_reflections(path, column=None, dmin=None, block=None, warn=None):
    """Read amplitudes from an mmCIF structure-factor file and expand them to P1.

    ``block``: the data block's name (default: the first block with merged reflections,
    ``_refln``).  ``column``: the ``_refln`` item to read, without the ``_refln.``
    prefix (default: F_meas_au, else F_meas, pdbx_F_plus...).  Intensity items
    (intensity_meas, F_squared_meas, pdbx_I_plus...) are read only when named, as
    sqrt(max(I, 0)), with a warning.  Space group and cell come from the block (gemmi
    takes them from the first block when a later one lacks them).  ``dmin`` and
    missing values ('?' or '.') as in :func:`read_mtz`.
    """
    what = "mmCIF reflection"
    p = _check_readable(path, what)
    gemmi = _gemmi(what, p)
    dmin = _check_dmin(dmin, what, p)
    try:
        doc = gemmi.cif.read(p)
        rblocks = gemmi.as_refln_blocks(doc)
    except (RuntimeError, ValueError, OSError, IndexError) as exc:
        raise InputFileError(f"{what} file {p!r} is not a readable mmCIF file: {' '.join(str(exc).split())}") from None
    usable = [rb for rb in rblocks if rb.default_loop is not None]
    if not usable:
        raise InputFileError(f"{what} file {p!r} has no _refln (or _diffrn_refln) loop with h k l indices")
    if block is None:
        merged = [rb for rb in usable if rb.is_merged()]
        if not merged:
            raise InputFileError(f"{what} file {p!r} holds only unmerged reflections (_diffrn_refln); "
                                 "merge them first")
        rb = merged[0]
    else:
        names = [rb.block.name for rb in usable]
        if str(block) not in names:
            raise InputFileError(f"{what} file {p!r} has no reflection block {str(block)!r}; "
                                 f"its blocks: {', '.join(names)}")
        rb = usable[names.index(str(block))]
        if not rb.is_merged():
            raise InputFileError(f"{what} file {p!r}: block {rb.block.name!r} holds unmerged reflections "
                                 "(_diffrn_refln); merge them first")
    where = f"{what} file {p!r} (block {rb.block.name!r})"
    labels = list(rb.column_labels())
    for idx in ("index_h", "index_k", "index_l"):
        if idx not in labels:
            raise InputFileError(f"{where} has no _refln.{idx}; its items: {', '.join(labels)}")
    if column is None:
        found = [n for n in CIF_AMPLITUDE_NAMES if n in labels]
        if not found:
            inten = [n for n in labels if _cif_kind(n) == "I"]
            hint = (f"; intensities ({', '.join(inten)}) are read as sqrt(I) when named with the column option "
                    "(-column)") if inten else ""
            raise InputFileError(f"{where} has no amplitude item ({', '.join(CIF_AMPLITUDE_NAMES)}); its items: "
                                 f"{', '.join(labels)}{hint}")
        label = found[0]
    else:
        label = str(column)
        if label.startswith("_refln."):
            label = label[len("_refln."):]
        if label not in labels:
            raise InputFileError(f"{where} has no column {label!r}; its items: {', '.join(labels)}")
    kind = _cif_kind(label)
    if kind is None:
        raise InputFileError(f"{where}: column {label!r} is neither an amplitude nor an intensity item "
                             f"(amplitudes: {', '.join(CIF_AMPLITUDE_NAMES)}; intensities: "
                             f"{', '.join(CIF_INTENSITY_NAMES)})")
    if rb.spacegroup is None:
        given = [v for v in (rb.block.find_value(t) for t in ("_symmetry.space_group_name_H-M",
                                                               "_space_group.name_H-M_alt")) if v]
        raise InputFileError(f"{where}: " + (f"space group {gemmi.cif.as_string(given[0])!r} is not known"
                                             if given else "no space group (_symmetry.space_group_name_H-M or "
                                             "_space_group.name_H-M_alt)"))
    try:
        hkl = np.asarray(rb.make_miller_array(), dtype=np.int64)
        raw = np.asarray(rb.make_float_array(label), dtype=np.float64)
    except (RuntimeError, ValueError) as exc:
        raise InputFileError(f"{where}: {' '.join(str(exc).split())}") from None
    if len(hkl) == 0:
        raise InputFileError(f"{where} holds no reflections")
    values = _amplitudes_from(raw, label, kind == "I", where, warn)
    return _finish(hkl, values, _rotations(rb.spacegroup), rb.cell, dmin, where, p, rb.spacegroup.hm, label)


# ----------------------------------------------------------------------------- model

def structure_factors_from_model(path, dmin, method="fft", rate=3.0, warn=None):
    """|F| from a coordinate file (PDB or mmCIF) for every P1 reflection with d >= dmin.

    The first model's atoms are used as written, with their occupancies and (isotropic
    or anisotropic) B factors; the unit cell and space group come from the file
    (CRYST1 or _cell/_symmetry), and symmetry mates are generated from the space group.
    Form factors: the IT92 four-Gaussian-plus-constant X-ray form factors of neutral
    atoms (International Tables for Crystallography Vol. C, Table 6.1.1.4, as tabulated
    in gemmi; atomic charges are ignored) and no anomalous terms f', f''.  So
    F(h) = sum_j occ_j f_j(s) exp(-B_j s^2/4) exp(2 pi i h.x_j), s = 1/d, summed over
    all atoms in the cell; no bulk solvent.  Systematically absent reflections are
    listed with |F| = 0.

    ``method``: ``"fft"`` (default) samples the density on a grid and Fourier
    transforms it (gemmi's DensityCalculatorX; ``rate`` is the grid's oversampling,
    relative error about 1e-4 at the default); ``"direct"`` sums over atoms for each
    reflection (gemmi's StructureFactorCalculatorX; exact, for small models).
    """
    what = "coordinate"
    p = _check_readable(path, what)
    gemmi = _gemmi(what, p)
    dmin = _check_dmin(dmin, what, p, required=True)
    if method not in ("fft", "direct"):
        raise ParameterError(f"{what} file {p!r}: method {method!r} is not known (choose 'fft' or 'direct')")
    try:
        rate = float(rate)
    except (TypeError, ValueError):
        raise ParameterError(f"{what} file {p!r}: rate {rate!r} is not a number") from None
    if not (math.isfinite(rate) and rate >= 1.0):
        raise ParameterError(f"{what} file {p!r}: rate {rate!r} must be at least 1 (grid oversampling)")
    where = f"{what} file {p!r}"
    try:
        st = gemmi.read_structure(p, format=gemmi.CoorFormat.Detect)
    except (RuntimeError, ValueError, OSError, IndexError) as exc:
        raise InputFileError(f"{where} is not a readable PDB or mmCIF file: {' '.join(str(exc).split())}") from None
    if len(st) == 0 or st[0].count_atom_sites() == 0:
        raise InputFileError(f"{where} holds no atoms (is it a PDB or mmCIF coordinate file?)")
    if len(st) > 1:
        _warn(warn, f"{where} holds {len(st)} models; only the first is used")
    model = st[0]
    unknown = gemmi.Element("X")
    for cra in model.all():
        if cra.atom.element == unknown:
            raise InputFileError(
                f"{where}: atom {cra.atom.name!r} of residue {cra.residue.name} {cra.residue.seqid} (chain "
                f"{cra.chain.name}) has no known element; give one in the element column")
        if not (cra.atom.occ >= 0 and math.isfinite(cra.atom.b_iso)):
            raise InputFileError(f"{where}: atom {cra.atom.name!r} of residue {cra.residue.name} {cra.residue.seqid} "
                                 f"has occupancy {cra.atom.occ:g} and B {cra.atom.b_iso:g}")
    if not st.cell.is_crystal():
        raise InputFileError(f"{where} has no unit cell (a CRYST1 record, or the _cell category in mmCIF)")
    sg = st.find_spacegroup()
    if sg is None:
        raise InputFileError(f"{where}: space group {st.spacegroup_hm!r} is not known")
    rc = st.cell.reciprocal()
    # the FFT grid's size, before gemmi allocates it
    npts = float(np.prod([2.0 * rate / (dmin * x) for x in (rc.a, rc.b, rc.c)]))
    if method == "fft" and npts > MAX_MAP_POINTS:
        raise ParameterError(f"{where}: dmin {dmin:g} A needs a density map of about {npts:.3g} points; too large "
                             "(raise dmin)")
    st.setup_cell_images()
    label = f"|F| computed from the model ({method})"
    # gemmi's own cuts may drop reflections lying exactly on dmin; ask a little past it
    # and cut exactly below
    dreach = dmin * (1.0 - 1e-6)
    if method == "fft":
        dc = gemmi.DensityCalculatorX()
        dc.d_min = dmin
        dc.rate = rate
        dc.set_refmac_compatible_blur(model)
        dc.grid.setup_from(st)
        dc.put_model_density_on_grid(model)
        fgrid = gemmi.transform_map_to_f_phi(dc.grid)
        asu = fgrid.prepare_asu_data(dmin=dreach, unblur=dc.blur)
        hkl = np.asarray(asu.miller_array, dtype=np.int64)
        amp = np.abs(np.asarray(asu.value_array, dtype=np.complex128))
    else:
        hkl = np.asarray(gemmi.make_miller_array(st.cell, sg, dreach), dtype=np.int64)
        calc = gemmi.StructureFactorCalculatorX(st.cell)
        amp = np.array([abs(calc.calculate_sf_from_model(model, [int(x) for x in h])) for h in hkl])
    full = np.asarray(gemmi.make_miller_array(st.cell, gemmi.SpaceGroup("P 1"), dreach, unique=False),
                      dtype=np.int64)
    full = full[_within(st.cell, full, dmin)]
    if len(full) == 0:
        raise InputFileError(f"{where}: no reflection reaches dmin {dmin:g} A for this cell")
    listed = _within(st.cell, hkl, dmin)
    hkl, amp = hkl[listed], amp[listed]
    data = _finish(hkl, amp, _rotations(sg), st.cell, None, where, p, sg.hm, label)
    # gemmi's lists leave out systematic absences: they are listed with |F| = 0, so that
    # -default_F (meant for reflections beyond dmin) does not fill them; anything else
    # missing (a reflection on the edge of gemmi's cut) is summed directly
    missing = full[~np.isin(_keys(full, full), _keys(data.indices, full))]
    if len(missing):
        vals = np.zeros(len(missing))
        present = ~_systematically_absent(missing, sg)
        if present.any():
            calc = gemmi.StructureFactorCalculatorX(st.cell)
            vals[present] = [abs(calc.calculate_sf_from_model(model, [int(x) for x in h]))
                             for h in missing[present]]
        idx = np.concatenate([data.indices, missing])
        val = np.concatenate([data.amplitudes, vals])
        order = np.lexsort((idx[:, 2], idx[:, 1], idx[:, 0]))
        data = ReflectionData(idx[order], val[order], source=p, cell=data.cell, spacegroup=data.spacegroup,
                              column=label)
    return data


def _systematically_absent(hkl, spacegroup):
    """True where the space group forces F = 0: an operation (with any centring) that
    maps h onto itself (h R = h) with a phase shift h.t that is not a whole turn."""
    ops = spacegroup.operations()
    den = 24   # gemmi.Op.DEN
    hkl = np.asarray(hkl, dtype=np.int64)
    absent = np.zeros(len(hkl), dtype=bool)
    for op in ops.sym_ops:
        fixed = np.all(hkl @ (np.array(op.rot, dtype=np.int64) // den) == hkl, axis=1)
        for cen in ops.cen_ops:
            shift = hkl @ (np.array(op.tran, dtype=np.int64) + np.array(cen, dtype=np.int64))
            absent |= fixed & (shift % den != 0)
    return absent


def _keys(hkl, box):
    """One integer per index triple (for membership tests), within the ranges of ``box``."""
    m = np.abs(np.asarray(box)).max(axis=0) + 1
    h = np.asarray(hkl) + m
    return (h[:, 0] * (2 * m[1] + 1) + h[:, 1]) * (2 * m[2] + 1) + h[:, 2]


def _within(cell, hkl, dmin):
    """Reflections with d >= dmin (one reflection exactly at dmin is kept)."""
    inv_d2 = np.asarray(cell.calculate_1_d2_array(np.asarray(hkl, dtype=np.int32).reshape(-1, 3)),
                        dtype=np.float64)
    return inv_d2 <= (1.0 / (dmin * dmin)) * (1.0 + 1e-9)
