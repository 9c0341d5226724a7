"""Numba's cache key for nbragg: every file with compiled code, and nothing else."""

import shutil

from nbragg import _jitcache


def _stamp(monkeypatch, pkg):
    monkeypatch.setattr(_jitcache, "_PKG_DIR", str(pkg))
    monkeypatch.setattr(_jitcache, "_BENCH", str(pkg / "bench.py"))
    monkeypatch.setattr(_jitcache, "_STAMP", None)
    return _jitcache.package_stamp()


def test_the_stamp_follows_compiled_code_only(tmp_path, monkeypatch):
    pkg = tmp_path / "nbragg"
    shutil.copytree(_jitcache._PKG_DIR, pkg, ignore=shutil.ignore_patterns("__pycache__", "data"))
    base = _stamp(monkeypatch, pkg)
    for name in ("cli.py", "bench.py", "resident.py"):      # no compiled code of their own
        with open(pkg / name, "a") as fh:
            fh.write("\n# an edit\n")
        assert _stamp(monkeypatch, pkg) == base, name
    for name in ("noise.py", "kernels/physics.py"):         # compiled code
        with open(pkg / name, "a") as fh:
            fh.write("\n# an edit\n")
        assert _stamp(monkeypatch, pkg) != base, name
        base = _stamp(monkeypatch, pkg)
