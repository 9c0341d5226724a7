"""Full-width vectors for the kernels on CPUs with AVX-512.

On Intel's AVX-512 CPUs LLVM prefers 256-bit vectors (its ``prefer-256-bit`` tuning, a
hedge against the clock slowing down in mixed code).  nbragg's pixel loops are long runs
of multiply-adds that do not mind: with 512-bit vectors B2's forward runs about 1.3x as
fast, in float32 too, and its gradient likewise (``python -m nbragg.bench``).  The images
are the same bit for bit (the width reorders no arithmetic of theirs: tested; Numba here
uses no vector maths library, which could round a vectorised exp or sin differently at
each width); the gradients' sums, reassociated already, round differently.

Numba has one code generator per process, set up when the first Numba function is
defined, so the choice is the process's, for every library's Numba code in it:
:func:`prefer_wide_vectors` makes it, before that moment, in
``numba.core.config.CPU_FEATURES`` (the host's features with ``-prefer-256-bit``), unless
the user chose the features (``NUMBA_CPU_FEATURES``, ``NUMBA_CPU_NAME``), the CPU has no
AVX-512, a Numba function was defined before nbragg's kernels were imported (another
library's, say: the width then stays LLVM's), or ``NBRAGG_VECTOR_BITS=256`` asks for
LLVM's own choice.  Numba keys its on-disk cache on the features, so each width keeps its
own machine code.
"""

import os
import sys

ENV = "NBRAGG_VECTOR_BITS"
_CHOICES = ("256", "512")


def requested_bits(environ=None, stderr=None):
    """The width ``NBRAGG_VECTOR_BITS`` asks for: "512" (the default) or "256".  Any other
    value is reported on one WARNING line and taken as "256", which changes nothing (this
    runs as the kernels are imported, where no command could report an error yet)."""
    environ = os.environ if environ is None else environ
    value = environ.get(ENV, "").strip() or "512"
    if value not in _CHOICES:
        print(f"WARNING: {ENV}={environ.get(ENV)!r} is neither 512 (full-width vectors where the CPU has AVX-512, "
              f"the default) nor 256 (LLVM's own choice); taking 256", file=stderr or sys.stderr)
        return "256"
    return value


def prefer_wide_vectors(environ=None, stderr=None):
    """Ask Numba's code generator for 512-bit vectors where :mod:`this module <nbragg._vector_width>`
    says so.  Returns the feature string set, or None where nothing was changed."""
    environ = os.environ if environ is None else environ
    if requested_bits(environ, stderr) != "512":
        return None
    if environ.get("NUMBA_CPU_FEATURES") is not None or environ.get("NUMBA_CPU_NAME") is not None:
        return None
    try:
        from numba.core import config
        from numba.core.codegen import get_host_cpu_features
        from numba.core.registry import cpu_target
    except (ImportError, AttributeError):    # (another Numba's layout: its own choice)
        return None
    if config.CPU_FEATURES is not None or config.CPU_NAME is not None:
        return None
    if "_toplevel_target_context" in vars(cpu_target):      # (set up already: too late to change)
        return None
    features = get_host_cpu_features()
    names = features.split(",")
    if "+avx512f" not in names or "-prefer-256-bit" in names:
        return None
    config.CPU_FEATURES = features + ",-prefer-256-bit"
    return config.CPU_FEATURES


def describe():
    """One line saying which vectors this process's Numba code uses (for reports such as the
    benchmark's; sets up Numba's code generator if nothing has yet)."""
    from numba.core.registry import cpu_target
    names = cpu_target.target_context.codegen().magic_tuple()[2].split(",")
    if "+avx512f" not in names:
        return "vectors: LLVM's choice (no AVX-512)"
    if "-prefer-256-bit" in names:
        return "vectors: 512-bit (AVX-512)"
    return (f"vectors: LLVM's choice, 256-bit on this AVX-512 CPU ({ENV}=256, the user's NUMBA_CPU_FEATURES, or "
            f"Numba set up before nbragg's kernels were imported)")
