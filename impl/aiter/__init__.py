"""AITER kernel provider: ``loader`` (import AITER's Triton kernels without ROCm, with named
patches), ``triton_kernels`` (adapters for AITER's Triton kernels), ``rocm_ops`` (thin adapters
for the ROCm-only CK/ASM/HIP entry points, not verified off ROCm), ``support`` (availability and
device-dependent capabilities shared by the two AITER MHA backends). Its ``attncheck bench``
rows live in ``attncheck/bench``."""
