"""Plain-numpy set-up: user-unit records -> float64 SI arrays the kernels eat."""
