"""Test-session setup shared by every test folder.

Triton reads TRITON_INTERPRET when triton itself is imported, so it is set here, before any test
module can import it: without a CUDA GPU the Triton kernels run in the interpreter on the CPU.
"""
import os


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")
