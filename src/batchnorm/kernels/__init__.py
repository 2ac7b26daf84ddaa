"""Kernels: pure array math, no validation and no state (reference NumPy; fast Numba)."""
