"""CPU kernels used by every layer: oneDNN matrix products (linear, forward and backward) and prompt attention,
chosen per process by a one-off probe where they beat torch's BLAS (``HOOKMOE_CPU_GEMM=torch|onednn|auto``).
"""

from hookmoe.kernels import cpu_gemm

__all__ = ["cpu_gemm"]
