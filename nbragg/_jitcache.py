"""Numba's on-disk cache, keyed on the whole package.

Numba decides whether a cached compilation is still valid from the source file of the
function alone.  nbragg's kernels call functions in other files (physics, derivatives),
so a change there would leave stale machine code behind.  This locator gives every
nbragg function the same freshness stamp: a hash of all of nbragg's Python sources that
hold compiled code.  Any change to one of them recompiles everything once.
"""

import hashlib
import os

from . import _numba_inline, _vector_width

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_STAMP = None
_BENCH = os.path.join(_PKG_DIR, "bench.py")


def package_stamp():
    global _STAMP
    if _STAMP is None:
        h = hashlib.sha256()
        for root, dirs, files in os.walk(_PKG_DIR):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    with open(path, "rb") as fh:
                        text = fh.read()
                    if b"@njit" not in text and b"njit(" not in text:   # (numba.cuda code has its own)
                        continue
                    if path == _BENCH:      # (its one compiled function is text run in another process)
                        continue
                    h.update(os.path.relpath(path, _PKG_DIR).encode())
                    h.update(text)
        _STAMP = h.hexdigest()
    return _STAMP


def _in_package(py_file):
    try:
        return os.path.commonpath([os.path.abspath(py_file), _PKG_DIR]) == _PKG_DIR
    except ValueError:
        return False


def install():
    """Register the package-wide locators in front of Numba's own (idempotent)."""
    try:
        from numba.core import caching
    except ImportError:  # pragma: no cover - numba is a dependency
        return False
    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)
    if impl is None or any(getattr(c, "_nbragg", False) for c in impl._locator_classes):
        return impl is not None

    class PackageStamped:
        """Numba's locator, for nbragg's files only, with the package-wide stamp."""
        _nbragg = True

        @classmethod
        def from_function(cls, py_func, py_file):
            if not _in_package(py_file):
                return None
            return super().from_function(py_func, py_file)

        def get_source_stamp(self):
            return package_stamp()

    class InTree(PackageStamped, caching.InTreeCacheLocator):
        pass

    class UserWide(PackageStamped, caching.UserWideCacheLocator):
        pass

    impl._locator_classes[:0] = [InTree, UserWide]
    return True


_vector_width.prefer_wide_vectors()     # (before Numba's code generator is set up)
install()
_numba_inline.install()     # (shorter first compiles: see that module)
