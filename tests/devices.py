"""Where the tests of the Triton kernels run: on CUDA when there is one, else on the CPU, under
Triton's interpreter (which tests/conftest.py switches on before triton is imported)."""

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
