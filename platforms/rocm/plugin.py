"""The AMD GPU platform plugin: the GPU platform of platforms/cuda on torch's ROCm (HIP) build."""
from kvserve.platforms.cuda.plugin import GpuPlatform

plugin = GpuPlatform("rocm")
