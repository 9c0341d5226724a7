"""Structure factors from MTZ, mmCIF reflection and coordinate files (nbragg.io.reflections
and the -mtz / -sf_cif / -model flags).

The symmetry expansions are checked against equivalent-index lists written out here by
hand as integer matrices (International Tables' equivalent reflections), and computed
structure factors against a direct summation in numpy; gemmi only writes the input
files and supplies the form-factor coefficients.
"""

import io
import math
import sys

import numpy as np
import pytest

gemmi = pytest.importorskip("gemmi")

from nbragg import cli  # noqa: E402
from nbragg.errors import InputFileError, NbraggError, ParameterError  # noqa: E402
from nbragg.io.hkl import read_hkl  # noqa: E402
from nbragg.io.reflections import (read_mmcif_reflections, read_mtz,  # noqa: E402
                                   structure_factors_from_model)

# equivalent reflections h' = M h of each Laue class used (Friedel mates added separately)
EQUIV = {
    # 422 (P 43 21 2): hkl, -h-kl, -khl, k-hl, -hk-l, h-k-l, kh-l, -k-h-l
    "P 43 21 2": [
        [[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[-1, 0, 0], [0, -1, 0], [0, 0, 1]],
        [[0, -1, 0], [1, 0, 0], [0, 0, 1]], [[0, 1, 0], [-1, 0, 0], [0, 0, 1]],
        [[-1, 0, 0], [0, 1, 0], [0, 0, -1]], [[1, 0, 0], [0, -1, 0], [0, 0, -1]],
        [[0, 1, 0], [1, 0, 0], [0, 0, -1]], [[0, -1, 0], [-1, 0, 0], [0, 0, -1]],
    ],
    # 2/m, unique axis b (P 1 21/c 1): hkl, -hk-l, -h-k-l, h-kl
    "P 1 21/c 1": [
        [[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[-1, 0, 0], [0, 1, 0], [0, 0, -1]],
        [[-1, 0, 0], [0, -1, 0], [0, 0, -1]], [[1, 0, 0], [0, -1, 0], [0, 0, 1]],
    ],
    # 321 on hexagonal axes (i = -h-k): hkl, kil, ihl, kh-l, hi-l, ik-l
    "P 3 2 1": [
        [[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[0, 1, 0], [-1, -1, 0], [0, 0, 1]],
        [[-1, -1, 0], [1, 0, 0], [0, 0, 1]], [[0, 1, 0], [1, 0, 0], [0, 0, -1]],
        [[1, 0, 0], [-1, -1, 0], [0, 0, -1]], [[-1, -1, 0], [0, 1, 0], [0, 0, -1]],
    ],
}
CELLS = {
    "P 43 21 2": (20.0, 20.0, 30.0, 90.0, 90.0, 90.0),
    "P 1 21/c 1": (15.0, 18.0, 22.0, 90.0, 104.5, 90.0),
    "P 3 2 1": (21.0, 21.0, 16.0, 90.0, 90.0, 120.0),
}


def inv_d2(cell, hkl):
    """1/d^2 from the cell's reciprocal metric tensor (numpy only)."""
    a, b, c = cell[:3]
    al, be, ga = (math.radians(x) for x in cell[3:])
    G = np.array([[a * a, a * b * math.cos(ga), a * c * math.cos(be)],
                  [a * b * math.cos(ga), b * b, b * c * math.cos(al)],
                  [a * c * math.cos(be), b * c * math.cos(al), c * c]])
    hkl = np.asarray(hkl, dtype=float)
    return np.einsum("ni,ij,nj->n", hkl, np.linalg.inv(G), hkl)


def asu_data(sg, dmin=2.5, seed=0):
    """An asymmetric unit (from gemmi) with random amplitudes, a few of them missing."""
    cell = CELLS[sg]
    hkl = np.asarray(gemmi.make_miller_array(gemmi.UnitCell(*cell), gemmi.SpaceGroup(sg), dmin), dtype=np.int64)
    rng = np.random.default_rng(seed)
    f = np.round(rng.uniform(1.0, 100.0, len(hkl)), 2).astype(np.float32).astype(np.float64)
    f[::17] = np.nan
    return hkl, f


def hand_p1(sg, hkl, f, dmin=None):
    """{(h, k, l): F} by the hand-written equivalents plus Friedel mates."""
    out = {}
    for h, v in zip(hkl, f):
        if np.isnan(v):
            continue
        if dmin is not None and inv_d2(CELLS[sg], [h])[0] > 1.0 / dmin ** 2:
            continue
        for M in EQUIV[sg]:
            for e in (np.array(M) @ h, -(np.array(M) @ h)):
                key = tuple(int(x) for x in e)
                assert out.get(key, v) == v
                out[key] = v
    return out


def as_dict(data):
    return {tuple(int(x) for x in h): float(v) for h, v in zip(data.indices, data.amplitudes)}


def write_mtz(path, sg, hkl, columns):
    """columns: [(label, type, values)]."""
    mtz = gemmi.Mtz(with_base=True)
    mtz.spacegroup = gemmi.SpaceGroup(sg)
    mtz.set_cell_for_all(gemmi.UnitCell(*CELLS[sg]))
    mtz.add_dataset("test")
    for label, typ, _ in columns:
        mtz.add_column(label, typ)
    data = np.column_stack([hkl.astype(np.float32)] + [np.asarray(v, dtype=np.float32) for _, _, v in columns])
    mtz.set_data(data)
    mtz.write_to_file(str(path))
    return path


def write_sf_cif(path, sg, hkl, f, item="F_meas_au"):
    """An mmCIF structure-factor file written by hand; '?' marks a missing value."""
    a, b, c, al, be, ga = CELLS[sg]
    lines = ["data_rtestsf", f"_cell.length_a {a}", f"_cell.length_b {b}", f"_cell.length_c {c}",
             f"_cell.angle_alpha {al}", f"_cell.angle_beta {be}", f"_cell.angle_gamma {ga}",
             f"_symmetry.space_group_name_H-M '{sg}'", "loop_", "_refln.index_h", "_refln.index_k",
             "_refln.index_l", "_refln.status", f"_refln.{item}", f"_refln.{item}_sigma" if item.startswith("F")
             else "_refln.intensity_sigma"]
    for h, v in zip(hkl, f):
        val = "?" if np.isnan(v) else f"{v:.6f}"
        lines.append(f"{h[0]} {h[1]} {h[2]} o {val} 1.0")
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------- MTZ

@pytest.mark.parametrize("sg", sorted(EQUIV))
def test_mtz_expands_to_the_hand_written_p1_list(sg, tmp_path):
    hkl, f = asu_data(sg)
    path = write_mtz(tmp_path / "asu.mtz", sg, hkl, [("FP", "F", f), ("SIGFP", "Q", np.ones(len(f)))])
    data = read_mtz(path)
    expected = hand_p1(sg, hkl, f)
    assert data.column == "FP" and data.spacegroup == sg
    assert as_dict(data) == expected
    # every Friedel mate is there, with the same amplitude
    got = as_dict(data)
    assert all(got[(-h, -k, -l)] == v for (h, k, l), v in got.items())
    # missing values are not listed (nor any of their equivalents)
    missing = {tuple(h) for h, v in zip(hkl.tolist(), f) if np.isnan(v)}
    assert missing and not missing & set(got)


@pytest.mark.parametrize("sg", sorted(EQUIV))
def test_mtz_resolution_cut_drops_exactly_the_reflections_beyond_dmin(sg, tmp_path):
    hkl, f = asu_data(sg)
    path = write_mtz(tmp_path / "asu.mtz", sg, hkl, [("F", "F", f)])
    full = hand_p1(sg, hkl, f)
    s2 = inv_d2(CELLS[sg], list(full))
    dcut = 3.7
    assert np.min(np.abs(1 / np.sqrt(s2) - dcut)) > 1e-6     # nothing sits on the cut
    expected = {h: v for (h, v), x in zip(full.items(), s2) if x <= 1 / dcut ** 2}
    assert 0 < len(expected) < len(full)
    assert as_dict(read_mtz(path, dmin=dcut)) == expected
    assert as_dict(read_mtz(path, dmin=dcut)) == hand_p1(sg, hkl, f, dmin=dcut)


def test_mtz_column_choice_and_intensities(tmp_path):
    sg = "P 43 21 2"
    hkl, f = asu_data(sg)
    inten = f ** 2
    inten[1] = -4.0                                     # a negative intensity reads as 0
    path = write_mtz(tmp_path / "cols.mtz", sg, hkl,
                     [("FC", "F", 2 * f), ("FP", "F", f), ("IMEAN", "J", inten)])
    assert read_mtz(path).column == "FP"                # the common name wins over the first F
    assert as_dict(read_mtz(path, column="FC")) == {k: 2 * v for k, v in hand_p1(sg, hkl, f).items()}
    said = []
    data = read_mtz(path, column="IMEAN", warn=said.append)
    assert len(said) == 1 and "IMEAN" in said[0] and "sqrt" in said[0] and "1 negative" in said[0]
    expected = hand_p1(sg, hkl, np.sqrt(np.maximum(inten, 0)))
    got = as_dict(data)
    assert got.keys() == expected.keys()
    assert np.allclose([got[k] for k in expected], list(expected.values()), rtol=1e-6)
    only_i = write_mtz(tmp_path / "i.mtz", sg, hkl, [("IMEAN", "J", np.abs(inten))])
    with pytest.raises(InputFileError, match=r"no amplitude column \(type F\).*IMEAN \(J\)"):
        read_mtz(only_i)
    with pytest.raises(InputFileError, match="'SIG' has type Q"):
        read_mtz(write_mtz(tmp_path / "q.mtz", sg, hkl, [("F", "F", f), ("SIG", "Q", f)]), column="SIG")


def test_equivalent_reflections_with_different_amplitudes_are_refused(tmp_path):
    sg = "P 43 21 2"
    hkl = np.array([[1, 2, 3], [2, 1, -3], [1, 1, 1]])   # (2 1 -3) is (1 2 3) under kh-l
    path = write_mtz(tmp_path / "unmerged.mtz", sg, hkl, [("F", "F", [10.0, 12.0, 5.0])])
    with pytest.raises(InputFileError, match=r"unmerged.mtz.*different amplitudes \(10 and 12\)"):
        read_mtz(path)
    # the same value twice is harmless
    path = write_mtz(tmp_path / "dup.mtz", sg, hkl, [("F", "F", [10.0, 10.0, 5.0])])
    assert len(read_mtz(path)) == 16 + 8


# ----------------------------------------------------------------------------- mmCIF

@pytest.mark.parametrize("sg", sorted(EQUIV))
def test_mmcif_reflections_read_back_to_the_same_p1_list(sg, tmp_path):
    hkl, f = asu_data(sg)
    cif = read_mmcif_reflections(write_sf_cif(tmp_path / "rtestsf.cif", sg, hkl, f))
    mtz = read_mtz(write_mtz(tmp_path / "asu.mtz", sg, hkl, [("FP", "F", f)]))
    assert cif.column == "F_meas_au" and cif.spacegroup == sg
    assert np.array_equal(cif.indices, mtz.indices)
    assert np.allclose(cif.amplitudes, mtz.amplitudes, rtol=1e-6)
    assert as_dict(read_mmcif_reflections(tmp_path / "rtestsf.cif", dmin=3.7)).keys() == \
        hand_p1(sg, hkl, f, dmin=3.7).keys()


def test_mmcif_intensities_need_a_named_column(tmp_path):
    sg = "P 3 2 1"
    hkl, f = asu_data(sg)
    path = write_sf_cif(tmp_path / "i.cif", sg, hkl, f ** 2, item="intensity_meas")
    with pytest.raises(InputFileError, match="no amplitude item.*intensity_meas"):
        read_mmcif_reflections(path)
    said = []
    data = read_mmcif_reflections(path, column="intensity_meas", warn=said.append)
    assert said and "sqrt" in said[0]
    got, expected = as_dict(data), hand_p1(sg, hkl, f)
    assert got.keys() == expected.keys()
    assert np.allclose([got[k] for k in expected], list(expected.values()), rtol=1e-5)
    with pytest.raises(InputFileError, match=r"no column 'F_meas_au'; its items: .*intensity_meas"):
        read_mmcif_reflections(path, column="F_meas_au")


# ----------------------------------------------------------------------------- model

ATOMS = [   # element, x, y, z (Angstrom), occupancy, B
    ("C", 1.20, 2.30, 3.10, 1.00, 12.0),
    ("N", 3.55, 2.48, 4.05, 0.80, 15.5),
    ("O", 5.02, 6.11, 1.57, 1.00, 20.0),
    ("S", 7.90, 3.05, 8.93, 0.50, 9.0),
    ("C", 2.10, 7.70, 5.50, 0.65, 30.0),
]
MODEL_CELL = (16.0, 19.0, 23.0, 90.0, 90.0, 90.0)
# P 21 21 21 coordinates: x,y,z; -x+1/2,-y,z+1/2; x+1/2,-y+1/2,-z; -x,y+1/2,-z+1/2
P212121 = [
    (np.diag([1, 1, 1]), (0, 0, 0)), (np.diag([-1, -1, 1]), (0.5, 0, 0.5)),
    (np.diag([1, -1, -1]), (0.5, 0.5, 0)), (np.diag([-1, 1, -1]), (0, 0.5, 0.5)),
]


def pdb_text(sg):
    a, b, c, al, be, ga = MODEL_CELL
    lines = [f"CRYST1{a:9.3f}{b:9.3f}{c:9.3f}{al:7.2f}{be:7.2f}{ga:7.2f} {sg:<11s}{4 if sg != 'P 1' else 1:4d}"]
    for i, (el, x, y, z, occ, B) in enumerate(ATOMS, start=1):
        name = f" {el:<3s}"
        lines.append(f"HETATM{i:5d} {name} LIG A   1    {x:8.3f}{y:8.3f}{z:8.3f}{occ:6.2f}{B:6.2f}"
                     f"          {el:>2s}")
    lines.append("END")
    return "\n".join(lines) + "\n"


def direct_F(hkl, ops):
    """sum over symmetry images and atoms of occ f(s) exp(-B s^2/4) exp(2 pi i h.x), with
    IT92 coefficients (f(s) = sum a_i exp(-b_i s^2/4) + c) from gemmi's element table."""
    hkl = np.asarray(hkl, dtype=float)
    s2 = inv_d2(MODEL_CELL, hkl)
    F = np.zeros(len(hkl), dtype=complex)
    for el, x, y, z, occ, B in ATOMS:
        it = gemmi.Element(el).it92
        f = sum(a * np.exp(-b * s2 / 4) for a, b in zip(it.a, it.b)) + it.c
        frac = np.array([x / MODEL_CELL[0], y / MODEL_CELL[1], z / MODEL_CELL[2]])   # orthogonal cell
        for R, t in ops:
            F += occ * f * np.exp(-B * s2 / 4) * np.exp(2j * np.pi * hkl @ (R @ frac + np.array(t)))
    return F


@pytest.mark.parametrize("sg, ops", [("P 1", P212121[:1]), ("P 21 21 21", P212121)])
def test_model_structure_factors_match_a_direct_summation(sg, ops, tmp_path):
    path = tmp_path / "model.pdb"
    path.write_text(pdb_text(sg))
    dmin = 2.0
    fft = structure_factors_from_model(path, dmin)
    direct = structure_factors_from_model(path, dmin, method="direct")
    # every P1 reflection to dmin (h = 0 0 0 aside), absences included with |F| = 0
    a, b, c = MODEL_CELL[:3]
    box = np.array(np.meshgrid(*(np.arange(-int(n / dmin), int(n / dmin) + 1) for n in (a, b, c)),
                               indexing="ij")).reshape(3, -1).T
    sphere = box[(inv_d2(MODEL_CELL, box) <= 1 / dmin ** 2) & np.any(box != 0, axis=1)]
    assert {tuple(h) for h in fft.indices.tolist()} == {tuple(h) for h in sphere.tolist()}
    assert np.array_equal(fft.indices, direct.indices)
    ref = np.abs(direct_F(fft.indices, ops))
    # direct sums agree to rounding (gemmi keeps the coefficients in single precision)
    scale = sum(occ * (sum(gemmi.Element(el).it92.a) + gemmi.Element(el).it92.c)
                for el, *_, occ, _B in ATOMS) * len(ops)              # F(000)
    assert np.max(np.abs(direct.amplitudes - ref)) < 1e-5 * scale
    # the FFT route: its errors (grid sampling at 3x, density cut-off at 1e-5 of the
    # peak, single-precision maps) are absolute, about 1e-5 of F(000); 1e-4 leaves room
    assert np.max(np.abs(fft.amplitudes - ref)) < 1e-4 * scale
    strong = ref > 0.1 * np.sqrt(np.mean(ref ** 2))
    assert np.max(np.abs(fft.amplitudes - ref)[strong] / ref[strong]) < 1e-3
    if len(ops) > 1:                                     # the absences are zero
        absent = (fft.indices[:, 1] == 0) & (fft.indices[:, 2] == 0) & (fft.indices[:, 0] % 2 == 1)
        assert absent.sum() > 0 and np.all(fft.amplitudes[absent] == 0) and np.all(ref[absent] < 1e-9 * scale)
    # and gemmi's own direct calculator, called here on the same structure
    st = gemmi.read_structure(str(path))
    st.setup_cell_images()
    calc = gemmi.StructureFactorCalculatorX(st.cell)
    pick = np.linspace(0, len(fft) - 1, 60).astype(int)
    theirs = np.array([abs(calc.calculate_sf_from_model(st[0], [int(x) for x in fft.indices[i]])) for i in pick])
    assert np.max(np.abs(fft.amplitudes[pick] - theirs)) < 1e-4 * scale


def test_model_errors(tmp_path):
    no_atoms = tmp_path / "empty.pdb"
    no_atoms.write_text(pdb_text("P 1").split("\n")[0] + "\nEND\n")
    with pytest.raises(InputFileError, match="empty.pdb.*holds no atoms"):
        structure_factors_from_model(no_atoms, 2.0)
    no_cell = tmp_path / "nocell.pdb"
    no_cell.write_text("".join(pdb_text("P 1").splitlines(True)[1:]))
    with pytest.raises(InputFileError, match="nocell.pdb.*has no unit cell"):
        structure_factors_from_model(no_cell, 2.0)
    good = tmp_path / "good.pdb"
    good.write_text(pdb_text("P 1"))
    with pytest.raises(ParameterError, match="dmin -1 must be a positive"):
        structure_factors_from_model(good, -1)
    with pytest.raises(ParameterError, match="dmin"):
        structure_factors_from_model(good, None)


# ----------------------------------------------------------------------------- command line

BASE = ["-cell", *map(str, CELLS["P 43 21 2"]), "-N", "3", "-lambda", "1", "-distance", "30", "-pixel", "1",
        "-detpixels", "24", "-oversample", "1", "-nonoise", "-nopgm", "-noprogress"]


def run_cli(args, tmp_path, name):
    out = tmp_path / name
    assert cli.run(BASE + args + ["-floatfile", str(out), "-intfile", str(tmp_path / "i.img")],
                   stdout=io.StringIO(), stderr=io.StringIO()) == 0
    return np.fromfile(out, dtype="<f4")


def test_mtz_flag_gives_the_image_of_the_equivalent_hkl_file(tmp_path):
    sg = "P 43 21 2"
    hkl, f = asu_data(sg)
    mtz = write_mtz(tmp_path / "asu.mtz", sg, hkl, [("SIGF", "Q", np.ones(len(f))), ("F", "F", f)])
    p1 = hand_p1(sg, hkl, f)
    text = tmp_path / "p1.hkl"
    text.write_text("".join(f"{h} {k} {l} {float(v)!r}\n" for (h, k, l), v in sorted(p1.items())))
    assert as_dict(read_hkl(text)) == as_dict(read_mtz(mtz))
    ref = run_cli(["-hkl", str(text)], tmp_path, "hkl.bin")
    img = run_cli(["-mtz", str(mtz), "-column", "F"], tmp_path, "mtz.bin")
    assert ref.max() > 0 and np.array_equal(img, ref)
    cif = write_sf_cif(tmp_path / "rtestsf.cif", sg, hkl, f)
    # the text holds the values to 1e-6, the MTZ in single precision
    assert np.allclose(run_cli(["-sf_cif", str(cif)], tmp_path, "cif.bin"), ref, rtol=1e-5, atol=0)
    # a resolution cut changes the image the way the cut HKL file does
    cut = tmp_path / "cut.hkl"
    cut.write_text("".join(f"{h} {k} {l} {float(v)!r}\n" for (h, k, l), v in sorted(hand_p1(sg, hkl, f, 3.7).items())))
    assert np.array_equal(run_cli(["-mtz", str(mtz), "-sf_dmin", "3.7"], tmp_path, "m4.bin"),
                          run_cli(["-hkl", str(cut)], tmp_path, "h4.bin"))


def test_model_flag_runs(tmp_path):
    pdb = tmp_path / "m.pdb"
    pdb.write_text(pdb_text("P 1").replace(f"{MODEL_CELL[0]:9.3f}{MODEL_CELL[1]:9.3f}{MODEL_CELL[2]:9.3f}",
                                           "   20.000   20.000   30.000"))
    data = structure_factors_from_model(pdb, 3.0)
    text = tmp_path / "m.hkl"
    rows = zip(data.indices.tolist(), data.amplitudes.tolist())
    text.write_text("".join(f"{h} {k} {l} {v!r}\n" for (h, k, l), v in rows))
    img = run_cli(["-model", str(pdb), "-sf_dmin", "3"], tmp_path, "model.bin")
    assert img.max() > 0 and np.array_equal(img, run_cli(["-hkl", str(text)], tmp_path, "mh.bin"))


def cli_error(args, capsys):
    assert cli.main(BASE + args + ["-floatfile", "never.bin"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nbragg: error: ")
    return err


def test_command_line_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sg = "P 43 21 2"
    hkl, f = asu_data(sg)
    write_mtz(tmp_path / "asu.mtz", sg, hkl, [("FP", "F", f), ("SIGFP", "Q", f)])
    (tmp_path / "p1.hkl").write_text("1 2 3 10\n")
    err = cli_error(["-mtz", "asu.mtz", "-column", "FOBS"], capsys)
    assert "'FOBS'" in err and "FP (F)" in err and "SIGFP (Q)" in err and "asu.mtz" in err
    err = cli_error(["-mtz", "asu.mtz", "-hkl", "p1.hkl"], capsys)
    assert "-mtz asu.mtz" in err and "-hkl p1.hkl" in err and "one file only" in err
    err = cli_error(["-mtz", "asu.mtz", "-sf_cif", "x.cif"], capsys)
    assert "-mtz" in err and "-sf_cif" in err
    (tmp_path / "m.pdb").write_text(pdb_text("P 1"))
    err = cli_error(["-model", "m.pdb"], capsys)
    assert "-model m.pdb" in err and "-sf_dmin" in err
    err = cli_error(["-model", "m.pdb", "-sf_dmin", "0"], capsys)
    assert "-sf_dmin" in err and "positive" in err
    err = cli_error(["-mtz", "nowhere.mtz"], capsys)
    assert "-mtz" in err and "nowhere.mtz" in err and "does not exist" in err
    (tmp_path / "corrupt.mtz").write_text("this is not an MTZ file\n" * 20)
    err = cli_error(["-mtz", "corrupt.mtz"], capsys)
    assert "corrupt.mtz" in err and "not a readable MTZ file" in err
    (tmp_path / "corrupt.cif").write_text("loop_ nonsense\n")
    err = cli_error(["-sf_cif", "corrupt.cif"], capsys)
    assert "corrupt.cif" in err and "-sf_cif" in err
    # flags that act only with another give a warning, not an error
    said = io.StringIO()
    assert cli.run(BASE + ["-hkl", "p1.hkl", "-column", "F", "-floatfile", "w.bin"],
                   stdout=io.StringIO(), stderr=said) == 0
    assert "-column F has no effect" in said.getvalue()
    said = io.StringIO()
    other_cell = ["-cell", "21", "20", "30", "90", "90", "90"] + BASE[7:]
    assert cli.run(other_cell + ["-mtz", "asu.mtz", "-floatfile", "w.bin"], stdout=io.StringIO(), stderr=said) == 0
    assert "-mtz: the file's unit cell (20 20 30 90 90 90) differs from the simulated crystal's (21 20 30" \
        in said.getvalue()


def test_missing_gemmi_is_one_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "asu.mtz"
    path.write_bytes(b"MTZ ")
    monkeypatch.setitem(sys.modules, "gemmi", None)       # import gemmi now raises ImportError
    with pytest.raises(NbraggError, match=r"asu.mtz.*needs the gemmi package.*pip install gemmi.*crystallography"):
        read_mtz(path)
