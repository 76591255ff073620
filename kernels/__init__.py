"""Kernels of the memory layers, each beside the plain-PyTorch reference it must equal.

Installed as `umv2cli.kernels` (PyPI has a top-level `kernels`). One op per file, reference first.
"""


def resolve_impl(impl: str, x, op: str) -> str:
    """A kernel switch: "auto" → "triton" iff the tensor x is on CUDA; "triton" and "torch" as they are."""
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"{op}: impl={impl!r}; use 'auto', 'triton' or 'torch'")
    return impl if impl != "auto" else ("triton" if x.is_cuda else "torch")
