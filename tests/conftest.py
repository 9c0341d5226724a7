import gzip
import json
import os
import shutil
import sys
from pathlib import Path

# CUDA kernels are tested under Numba's CUDA simulator unless a run asks for the GPU
# (NUMBA_ENABLE_CUDASIM=0); this must happen before numba is imported.
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
# commands run by themselves, whatever resident server the machine has (test_resident
# starts its own)
os.environ["NBRAGG_RESIDENT"] = "off"

import numpy as np
import pytest

HERE = Path(__file__).parent
GOLDEN = HERE / "golden"
sys.path.insert(0, str(HERE))


def rows_as_panels(count):
    """A panel maker (build_model(exp, panels=...)): nanoBragg's one panel cut into
    ``count`` panels of equal rows, each with its own origin, as modules are built."""
    def make(geom):
        import dataclasses
        from nbragg.models.detector import nanobragg_panels
        (panel,) = nanobragg_panels(geom)
        rows = panel.spixels // count
        return [dataclasses.replace(panel, pix0=panel.pix0 + (rows * k) * panel.pixel * panel.sdet, spixels=rows,
                                    roi=(0, panel.fpixels - 1, 0, rows - 1)) for k in range(count)]
    return make


def golden_manifest():
    with open(GOLDEN / "cases.json") as fh:
        return json.load(fh)


def golden_cases():
    return golden_manifest()["cases"]


def golden_case(name):
    for c in golden_cases():
        if c["name"] == name:
            return c
    raise KeyError(name)


def golden_image(case):
    raw = gzip.open(GOLDEN / case["name"] / "image.bin.gz").read()
    return np.frombuffer(raw, dtype="<f4").reshape(case["spixels"], case["fpixels"])


def copy_case_inputs(case, dest):
    """Copy a golden case's input files (not its outputs) into ``dest``."""
    src = GOLDEN / case["name"]
    outputs = {"image.bin.gz", "intimage.img", "noiseimage.img", "image.pgm", "c_stdout.txt"}
    for f in src.iterdir():
        if f.name not in outputs:
            shutil.copy(f, dest / f.name)
    return dest


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(autouse=True)
def leaves_the_working_directory_alone():
    """Tests write only into their temporary folders: fail one that leaves a new file in
    the directory the suite runs from (where the command line's default outputs land)."""
    cwd = Path.cwd()
    before = set(os.listdir(cwd))
    yield
    if Path.cwd() != cwd:
        return
    new = sorted(n for n in set(os.listdir(cwd)) - before if not n.startswith("."))
    assert not new, f"the test wrote {new} into {cwd}; write into tmp_path instead"
