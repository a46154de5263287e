"""Triton and CUDA kernels for the CUDA platform."""
