"""Labels (nbragg.labels): the reflection table and the label images, checked against
the image itself (photons in a spot's mask, the intensity-weighted centroid), against a
second simulation with the reflection brought onto the Ewald sphere (partiality of a
still), and against the additivity of rotation frames."""

import numpy as np
import pytest

import nbragg
from nbragg.errors import ParameterError

pytest.importorskip("pandas")

# gaussian spots: compact, so isolated spots' photons do not mix
FINE = ("-cell 30 32 34 90 90 90 -misset 12 21 33 -default_F 100 -N 6 -lambda 1.0 -distance 50 -pixel 0.05 "
        "-detpixels 128 -oversample 4 -gauss_xtal")


def _exp(args=FINE, extra=""):
    return nbragg.Experiment.from_nanobragg_args((args + " " + extra).split(), warn=lambda m: None)


@pytest.fixture(scope="module")
def still():
    return nbragg.simulate(_exp(), labels=True, warn=lambda m: None)


def _interior(r, margin=8):
    T = r.reflections
    side = r.image.shape[-1]
    return [i for i in range(len(T)) if margin <= T.fast[i] <= side - margin and margin <= T.slow[i] <= side - margin]


def test_table_columns_and_values(still):
    T = still.reflections
    assert list(T.columns) == ["h", "k", "l", "panel", "fast", "slow", "photons", "partiality", "d"]
    assert len(T) >= 5 and not ((T.h == 0) & (T.k == 0) & (T.l == 0)).any()      # no direct beam
    assert np.all(np.diff(T.photons) <= 0) and np.all((T.partiality > 0) & (T.partiality <= 1))
    # resolution from the cell (orthorhombic: 1/d^2 = (h/a)^2 + (k/b)^2 + (l/c)^2)
    d = 1 / np.sqrt((T.h / 30.0) ** 2 + (T.k / 32.0) ** 2 + (T.l / 34.0) ** 2)
    np.testing.assert_allclose(T.d, d, rtol=1e-9)
    assert still.labels.reflection.shape == still.image.shape and still.labels.spot_mask.dtype == bool


def test_photons_in_a_spots_mask_equal_the_table(still):
    """With the spot mask taken down to 1e-10 of each spot's brightest pixel, an isolated
    spot's mask holds its table photons; the default mask (1 %) is the visible spot."""
    from nbragg.labels import label
    T, lab, img = still.reflections, still.labels, still.image
    _, deep = label(still.model, spot_fraction=1e-10)
    rows = _interior(still)
    assert len(rows) >= 4
    for i in rows:
        mask = deep.spot_mask & (deep.reflection == i)
        ys, xs = np.nonzero(mask)
        assert xs.min() > 0 and ys.min() > 0 and xs.max() < img.shape[1] - 1 and ys.max() < img.shape[0] - 1
        assert img[mask].sum() == pytest.approx(T.photons[i], rel=1e-6)
        visible = lab.spot_mask & (lab.reflection == i)
        assert 0 < visible.sum() < mask.sum() and img[visible].sum() > 0.9 * T.photons[i]


def test_predicted_centres_are_the_spots_centroids(still):
    T, lab, img = still.reflections, still.labels, still.image
    for i in _interior(still):
        mask = lab.spot_mask & (lab.reflection == i)
        ys, xs = np.nonzero(mask)
        w = img[mask]
        assert abs(T.fast[i] - (w * (xs + 0.5)).sum() / w.sum()) <= 0.05
        assert abs(T.slow[i] - (w * (ys + 0.5)).sum() / w.sum()) <= 0.05


def _rotation(axis, t):
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    K = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * K + (1 - np.cos(t)) * K @ K


def _on_the_sphere(exp, result, i, bracket=0.3):
    """(photons of reflection i in ``result`` over its photons with the crystal turned so
    that its lattice point lies on the Ewald sphere, its partiality there)."""
    from scipy.optimize import brentq
    from nbragg.models.geometry import rotation_xyz_matrix
    T, m = result.reflections, result.model
    real = np.real(m.crystal.real0)
    s0 = np.real(m.detector.beam) / m.wavelength
    h = np.array([T.h[i], T.k[i], T.l[i]], float)
    q = h @ np.linalg.inv(real).T
    axis = np.cross(s0, q)
    t = brentq(lambda t: np.linalg.norm(s0 + _rotation(axis, t) @ q) - 1 / m.wavelength, -bracket, bracket)
    c = exp.crystal
    turned = _rotation(axis, t) @ rotation_xyz_matrix(*np.radians(c.misset))
    T2 = nbragg.simulate(exp.replace(crystal=c.replace(misset=(0, 0, 0), orientation=turned)), labels=True,
                         warn=lambda m: None).reflections
    row = T2[(T2.h == h[0]) & (T2.k == h[1]) & (T2.l == h[2])]
    return T.photons[i] / float(row.photons.iloc[0]), float(row.partiality.iloc[0])


def test_still_partiality_against_the_reflection_on_the_ewald_sphere(still):
    """Turn the crystal so one reflection's lattice point lies on the Ewald sphere and
    simulate again: its photons there, against the still's, are 1 / partiality (to the
    few per cent the solid angle and polarization change with the small turn)."""
    T = still.reflections
    checked = 0
    for i in range(len(T)):
        if T.partiality[i] > 0.95:
            continue
        ratio, on_sphere = _on_the_sphere(_exp(), still, i, bracket=0.2)
        assert on_sphere == pytest.approx(1.0, abs=1e-9)
        assert ratio == pytest.approx(T.partiality[i], abs=0.02)
        checked += 1
        if checked == 3:
            break
    assert checked == 3


def test_rotation_partialities_add_up():
    """Two adjacent frames hold the partiality of the frame that spans both."""
    base = FINE.replace("-pixel 0.05 -detpixels 128", "-pixel 0.1 -detpixels 96").replace("-oversample 4", "-oversample 1")

    def table(extra):
        T = nbragg.simulate(_exp(base, extra), labels=True, warn=lambda m: None).reflections
        return {(int(a), int(b), int(c)): p for a, b, c, p in zip(T.h, T.k, T.l, T.partiality)}
    first, second = table("-phi -1 -osc 1 -phisteps 8"), table("-phi 0 -osc 1 -phisteps 8")
    both, wide = table("-phi -1 -osc 2 -phisteps 16"), table("-phi -40 -osc 80 -phisteps 400")
    common = [k for k in both if k in first and k in second]
    assert len(common) >= 3
    for k in common:
        assert first[k] + second[k] == pytest.approx(both[k], abs=1e-3)
    # a wider frame holds more of each rocking curve; most curves lie within 80 degrees
    # (those of reflections near the spindle's axis are wider)
    near = [k for k in wide if k in both]
    assert near and all(wide[k] >= both[k] - 1e-9 for k in near)
    assert np.median([wide[k] for k in near]) > 0.99


def test_shares_add_up_to_the_image():
    from nbragg.labels import label_shares
    exp = _exp(FINE.replace("-gauss_xtal", "").replace("-detpixels 128", "-detpixels 48"), "-mosaic 0.3 -mosaic_dom 4")
    model = nbragg.build_model(exp, warn=lambda m: None)
    image = nbragg.simulate(exp, warn=lambda m: None).image
    _, share, other = label_shares(model)
    np.testing.assert_allclose(share.sum(axis=-1)[0] + other[0], image, rtol=1e-12, atol=1e-15 * image.max())


def test_labels_on_panels_and_refusals():
    exp = _exp(FINE.replace("-detpixels 128", "-detpixels 48"))
    from nbragg.bench import tiled
    r = nbragg.simulate(tiled(exp, 2), labels=True, warn=lambda m: None)
    one = nbragg.simulate(exp, labels=True, warn=lambda m: None)
    assert r.labels.reflection.shape == (4, 24, 24)
    T, T1 = r.reflections, one.reflections
    for i in range(len(T1)):
        row = T[(T.h == T1.h[i]) & (T.k == T1.k[i]) & (T.l == T1.l[i])]
        assert float(row.photons.iloc[0]) == pytest.approx(T1.photons[i], rel=1e-9)
        p = int(row.panel.iloc[0])
        if np.isfinite(T1.fast[i]):
            # the panel's own pixel coordinates: tiles of 24 pixels
            assert float(row.fast.iloc[0]) + 24 * (p % 2) == pytest.approx(T1.fast[i], abs=1e-9)
            assert float(row.slow.iloc[0]) + 24 * (p // 2) == pytest.approx(T1.slow[i], abs=1e-9)
    with pytest.raises(ParameterError, match="oversample_omega"):
        nbragg.simulate(_exp(FINE.replace("-detpixels 128", "-detpixels 16"), "-oversample_omega"), labels=True,
                        warn=lambda m: None)


def test_still_partiality_of_square_spots_on_an_anisotropic_cell():
    """As for the Gaussian spots, but parallelepiped spots (nanoBragg's default) of a long
    cell with few cells along it: the transform's own cell only, never above 1."""
    args = ("-cell 50 50 200 90 90 90 -misset 12 21 33 -default_F 100 -N 3 -lambda 1.0 -distance 80 -pixel 0.1 "
            "-detpixels 96 -oversample 3")
    exp = _exp(args)
    r = nbragg.simulate(exp, labels=True, warn=lambda m: None)
    T = r.reflections
    assert np.all(T.partiality <= 1.0)
    checked = 0
    for i in range(len(T)):
        if not 0.2 < T.partiality[i] < 0.9 or not np.isfinite(T.fast[i]):
            continue
        ratio, _ = _on_the_sphere(exp, r, i)
        assert ratio == pytest.approx(T.partiality[i], abs=0.05)
        checked += 1
        if checked == 3:
            break
    assert checked >= 2


def test_reflection_photons_against_the_numpy_reference():
    """Every reflection's photons (min_fraction 0) against plain loops over pixels and
    samples (tests/reference.py), with mosaic domains, a sensor and polarization."""
    from reference import reference_reflection_photons
    from nbragg.labels import label
    exp = _exp("-cell 30 32 34 90 90 90 -misset 12 21 33 -default_F 100 -N 4 -lambda 1.0 -distance 50 -pixel 0.2 "
               "-detpixels 10 -oversample 2 -polar 0.4 -mosaic 0.5 -mosaic_dom 2 -detector_thick 100 "
               "-detector_abs 300 -detector_thicksteps 2")
    model = nbragg.build_model(exp, warn=lambda m: None)
    table, _ = label(model, min_fraction=0.0)
    ref = reference_reflection_photons(model)
    ref.pop((0, 0, 0), None)
    got = {(int(a), int(b), int(c)): p for a, b, c, p in zip(table.h, table.k, table.l, table.photons)}
    assert set(got) == {k for k, v in ref.items() if v > 0}
    for key, v in got.items():
        assert v == pytest.approx(ref[key], rel=1e-10), key
