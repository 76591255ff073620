"""umv2: scaling-law research on UltraMemV2 memory-layer language models (arXiv 2508.18756)."""

__version__ = "0.1.0"
