"""Triton kernels for packed low-bit matmuls (installed as `hfcompress.kernels`)."""

if __name__ == "kernels":
    # Imported under the top-level name: Python was started in the repository root (`python -c`,
    # `python -m pytest`), so this folder shadows Hugging Face's Kernel Hub package `kernels`,
    # which transformers imports. Hand the import over to that package.
    from ._shadow import hand_over

    hand_over(__file__)
