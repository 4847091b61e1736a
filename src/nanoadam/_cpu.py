"""ctypes binding to the fused CPU kernels in ``csrc/cpu_kernels.cpp``.

The library is built at install time as ``nanoadam/_cpu_kernels.so``, a plain shared library
(libstdc++ and libgomp, no libpython). ``available()`` says whether it loaded; callers fall back
to the eager reference path when it did not. Set ``NANOADAM_DISABLE_CPU_KERNELS=1`` to force the
reference path (tests use this to compare).
"""

from __future__ import annotations

import array
import ctypes
import functools
import importlib.machinery
import os
from pathlib import Path

import torch

_ABI_VERSION = 4


# NanoUpdateTask in csrc/cpu_kernels.cpp: 15 int64 words per tensor (pointers as integers).
UPDATE_TASK_FIELDS = ("param", "grad", "index", "exp_avg", "exp_avg_sq", "cohort_table", "numel", "chunk_size", "k",
                      "k_last", "offset", "index_bytes", "state_bytes", "position_bits", "seed")


class RefreshTask(ctypes.Structure):
    _fields_ = [
        ("param", ctypes.c_void_p),
        ("grad", ctypes.c_void_p),
        ("numel", ctypes.c_int64),
        ("chunk_size", ctypes.c_int64),
        ("old_index", ctypes.c_void_p),
        ("old_exp_avg", ctypes.c_void_p),
        ("old_exp_avg_sq", ctypes.c_void_p),
        ("old_k", ctypes.c_int64),
        ("old_k_last", ctypes.c_int64),
        ("index", ctypes.c_void_p),
        ("exp_avg", ctypes.c_void_p),
        ("exp_avg_sq", ctypes.c_void_p),
        ("k", ctypes.c_int64),
        ("k_last", ctypes.c_int64),
        ("offset", ctypes.c_int64),
        ("old_index_bytes", ctypes.c_int32),
        ("index_bytes", ctypes.c_int32),
        ("state_bytes", ctypes.c_int32),
        ("position_bits", ctypes.c_int32),
        ("key_source", ctypes.c_int32),
        ("filter_with_old_mask", ctypes.c_int32),
        ("newborn", ctypes.c_int32),
        ("merge_young", ctypes.c_int32),
        ("merge_old", ctypes.c_int32),
        ("merge_m_factor", ctypes.c_float),
        ("merge_v_factor", ctypes.c_float),
        ("merge_salt", ctypes.c_uint32),
    ]


KEY_SOURCES = {"small_weights": 0, "large_weights": 1, "large_gradients": 2}


def _library_path() -> Path | None:
    """The compiled library: a plain shared library (``setup.py`` builds ``_cpu_kernels.so``); a
    CPython-tagged name is still found for installs made before it was plain."""
    here = Path(__file__).resolve().parent
    for name in ["_cpu_kernels.so"] + [f"_cpu_kernels{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES]:
        candidate = here / name
        if candidate.exists():
            return candidate
    return None


def disabled_by_user() -> bool:
    return os.environ.get("NANOADAM_DISABLE_CPU_KERNELS", "") not in ("", "0")


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """The library and a few words on its state."""
    if disabled_by_user():
        return None, "disabled by NANOADAM_DISABLE_CPU_KERNELS"
    path = _library_path()
    if path is None:
        return None, "not built: no C++ compiler was found when nanoadam was installed"
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as error:
        return None, f"{path.name} failed to load: {error}"
    lib.nano_abi_version.restype = ctypes.c_int32
    if lib.nano_abi_version() != _ABI_VERSION:
        return None, f"{path.name} is from another version of nanoadam (reinstall it)"
    lib.nano_sparse_adamw.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32] + [ctypes.c_float] * 5 + [
        ctypes.c_int64]
    lib.nano_sparse_adamw.restype = None
    lib.nano_salt.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_uint32]
    lib.nano_salt.restype = ctypes.c_uint32
    lib.nano_refresh.argtypes = [ctypes.POINTER(RefreshTask), ctypes.c_int64, ctypes.c_int32]
    lib.nano_refresh.restype = None
    return lib, f"loaded from {path}"


def _library() -> ctypes.CDLL | None:
    return _load()[0]


def available() -> bool:
    """True when the compiled CPU kernels are installed and loadable."""
    return _library() is not None


def status() -> str:
    """Whether the kernels are in use, and if not, why."""
    return _load()[1]


def sparse_adamw(tasks: array.array, *, decay: float, one_minus_beta1: float, beta2: float, one_minus_beta2: float,
                 eps: float, step: int) -> None:
    """``tasks``: ``array("q")`` of ``len(UPDATE_TASK_FIELDS)`` words per tensor (built faster than a
    tensor of 1500 numbers)."""
    if not tasks:
        return
    address, length = tasks.buffer_info()
    _library().nano_sparse_adamw(address, length // len(UPDATE_TASK_FIELDS), torch.get_num_threads(), decay,
                                 one_minus_beta1, beta2, one_minus_beta2, eps, step)


def salt(ordinal: int, step: int, stream: int) -> int:
    """The kernel's own salt function (tests compare it with nanoadam.rounding.salt)."""
    return _library().nano_salt(ordinal, step, stream)


def refresh(tasks: list[RefreshTask]) -> None:
    if not tasks:
        return
    lib = _library()
    array = (RefreshTask * len(tasks))(*tasks)
    lib.nano_refresh(array, len(tasks), torch.get_num_threads())
