"""nbragg-refine-many: shots from an nbragg-dataset file, outputs, one-line errors."""

import json

import numpy as np
import pytest

from nbragg.refine_many_cli import main

pytest.importorskip("yaml")


@pytest.fixture(scope="module")
def stills(tmp_path_factory):
    """Six 48x48 stills of a small cubic crystal, with its HKL file and dataset spec."""
    from nbragg.dataset import generate, load_spec
    d = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(0)
    lines = [f"{h} {k} {l} {rng.uniform(50, 150):.2f}" for h in range(-8, 9) for k in range(-8, 9)
             for l in range(-8, 9) if (h, k, l) != (0, 0, 0)]
    (d / "truth.hkl").write_text("\n".join(lines) + "\n")
    spec = {"seed": 3, "images": 6, "shard_size": 6,
            "base": "-cell 40 40 40 90 90 90 -hkl truth.hkl -lambda 1.3 -distance 60 -pixel 0.5 -detpixels 48 "
                    "-oversample 1 -N 8 -fluence 3e26",
            "vary": {"orientation": "uniform", "Na": {"uniform": [7, 9]}},
            "outputs": {"float": True, "counts": "uint32"}, "compression": "none"}
    (d / "stills.json").write_text(json.dumps(spec))
    generate(load_spec(str(d / "stills.json")), str(d / "stills.h5"), workers=0, progress=False)
    return d


def _spec(d, **over):
    spec = {"shots": {"dataset": "stills.h5"}, "start": {"perturb": {"seed": 1, "Fhkl": 0.2, "misset": 0.02}},
            "shared": ["Fhkl", "distance"], "per_shot": ["misset_x", "misset_y", "Na"], "space_group": "P 1",
            "workers": 0, "max_iterations": 2, "output": "out", "progress": False}
    spec.update(over)
    p = d / "refine.json"
    p.write_text(json.dumps(spec))
    return str(p)


def test_refines_and_writes_hkl_mtz_and_report(stills, capsys):
    gemmi = pytest.importorskip("gemmi")
    main([_spec(stills)])
    out = capsys.readouterr().out
    assert "wrote" in out
    rep = json.loads((stills / "out.json").read_text())
    assert rep["history"][-1] < rep["history"][0]
    assert set(rep["shared"]) == {"distance"} and rep["shared_uncertainties"]["distance"] > 0
    assert len(rep["per_shot"]) == 6 and set(rep["per_shot"][0]) == {"misset_x", "misset_y", "Na"}
    truth = rep["against_truth"]
    assert truth["Fhkl"]["refined"] == rep["structure_factors"]["refined"] > 50
    assert truth["per_shot"]["misorientation_deg"]["max"] < 0.2
    mtz = gemmi.read_mtz_file(str(stills / "out.mtz"))
    assert [c.label for c in mtz.columns] == ["H", "K", "L", "F", "SIGF", "NOBS"]
    assert mtz.nreflections == truth["Fhkl"]["refined"]
    # the HKL file holds every refined grid point: nanoBragg reads it back
    from nbragg.io.hkl import read_hkl
    hkl = read_hkl(str(stills / "out.hkl"))
    F = dict(zip(map(tuple, hkl.indices.tolist()), hkl.amplitudes))
    data = np.array(mtz, copy=False)
    for h, k, l, f in data[:20, :4]:
        assert F[(int(h), int(k), int(l))] == pytest.approx(f, rel=1e-5)
        assert F[(-int(h), -int(k), -int(l))] == pytest.approx(f, rel=1e-5)     # P 1: Friedel mates


@pytest.mark.parametrize("over, message", [
    ({"colour": "red"}, "unknown field 'colour'"),
    ({"shots": {"dataset": "missing.h5"}}, "does not exist"),
    ({"shots": {"dataset": "stills.h5", "frames": [0, 99]}}, "shots.frames"),
    ({"shots": {"dataset": "stills.h5", "images": "nope"}}, "shots.images"),
    ({"per_shot": ["Fhkl"]}, "shared by every shot"),
    ({"start": {"hkl": "nothing.hkl"}}, "nothing.hkl"),
])
def test_bad_specs_are_one_line_errors(stills, capsys, over, message):
    assert main([_spec(stills, **over)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
