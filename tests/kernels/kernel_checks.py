"""What the Triton kernel tests share: the device (tests/devices.py) and tolerances against fp64
(the fixture `poisoned_empty` is in conftest.py).

On a machine without CUDA the kernels run under Triton's interpreter, which tests/conftest.py
switches on before triton is imported; sizes are tiny because it is 10³-10⁴× slower. With CUDA
the same tests run the compiled kernels on the GPU.
"""

import torch

from devices import DEVICE  # noqa: F401  (the kernel tests import it from here)

# relative L2 error against an fp64 reference on the same (rounded) inputs, per input dtype
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert torch.isfinite(actual).all(), "non-finite values: an output was not fully written"
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()
