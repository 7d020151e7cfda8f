"""Triton kernels for packed low-bit matmuls (installed as `hfcompress.kernels`)."""
