"""On-disk formats: the checks of a checkpoint before it loads, our native and compressed-tensors
layouts, the export formats, and how a compressed model saves."""
