"""``nanoadam.show_config()``: which implementation paths are active in this process, and why."""

from __future__ import annotations

import platform

import torch

from . import _cpu


def _triton_status() -> str:
    from . import functional

    try:
        import triton
    except ImportError:
        return "not installed (pip install 'nanoadam[gpu]'): CUDA tensors use the eager PyTorch path"
    if functional._TRITON_BROKEN:
        return f"failed in this process ({functional._TRITON_BROKEN[0]}): CUDA tensors use the eager PyTorch path"
    if not torch.cuda.is_available():
        return f"triton {triton.__version__} installed, no CUDA device: unused"
    return f"triton {triton.__version__}: serves contiguous float32/bf16 CUDA tensors"


def config() -> dict[str, str]:
    """The facts ``show_config`` prints, as a dict."""
    from . import __version__

    return {
        "nanoadam": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "cpu kernels": _cpu.status(),
        "cpu threads": str(torch.get_num_threads()),
        "triton kernels": _triton_status(),
    }


def show_config() -> None:
    """Prints which paths NanoAdam uses here: the compiled CPU kernels (contiguous float32 CPU
    tensors), the Triton kernels (CUDA), or the eager PyTorch reference for everything else."""
    facts = config()
    width = max(map(len, facts))
    for key, value in facts.items():
        print(f"{key:<{width}}  {value}")
