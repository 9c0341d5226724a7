"""Numba kernels: per-sample physics (physics.py) and the CPU pixel loops (cpu.py)."""
