"""Triton and HIP kernels for the ROCm platform."""
