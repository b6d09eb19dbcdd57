"""recnext: reproducible RecNeXt detection and instance segmentation on current PyTorch."""

__version__ = "0.1.0"
