"""Kernels: pure array math, no validation, no state (NumPy reference; Numba fast)."""
