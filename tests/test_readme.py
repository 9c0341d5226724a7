"""The README's Python examples, run exactly as printed (one namespace, in order), so that
they cannot rot; then a look at what they computed."""

import re

import numpy as np
import pytest

from conftest import HERE

README = HERE.parent / "README.md"


def python_blocks():
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


@pytest.mark.slow
def test_readme_python_examples_run_as_printed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks()
    assert len(blocks) >= 3
    ns = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md python block {i + 1}", "exec"), ns)
    out = capsys.readouterr().out
    assert "cell_a" in out
    # the refinement example starts off the truth and comes back to it
    fit, truth = ns["fit"], ns["exp"]
    assert fit.success and not fit.at_bounds, fit.message
    import nbragg
    want = nbragg.get_params(truth, fit.names)
    for n in fit.names:
        assert abs(fit.values[n] - want[n]) <= 4 * fit.uncertainties[n], (n, fit.values[n], want[n])
    assert np.isfinite(ns["J"]).all() and ns["J"].shape == (64 * 64, 7)
    # the two-panel detector
    assert ns["shot2"].image.shape == (2, 185, 194) and ns["shot2"].panels == ("asic0", "asic1")
    assert np.isfinite(ns["shot2"].image).all()
    # the bridges: a gradient for every parameter, and JAX's matching nbragg's
    assert set(ns["grads_j"]) == {"cell_a", "distance"} and np.isfinite(float(ns["value_j"]))
    assert all(p.grad is not None for p in ns["sim"].params.values())
    # the detector-response example: pixel values around the offset plus the counts
    shot = ns["shot"]
    assert shot.detected.adu.dtype == np.uint16 and shot.detected.adu.shape == (64, 64)
    assert abs(shot.detected.adu.astype(float).mean() - 40.0 - shot.detected.counts.mean()) < 1.0
