"""CPU kernels for the CPU platform."""
