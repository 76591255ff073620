"""Kernels of the memory layers, each beside the plain-PyTorch reference it must equal.

Installed as `umv2cli.kernels` (PyPI has a top-level `kernels`). One op per file, reference first.
"""
