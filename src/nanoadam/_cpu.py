"""ctypes binding to the fused CPU kernels in ``csrc/cpu_kernels.cpp``.

The library is built at install time as ``nanoadam/_cpu_kernels*.so``. ``available()`` says
whether it loaded; callers fall back to the eager reference path when it did not. Set
``NANOADAM_DISABLE_CPU_KERNELS=1`` to force the reference path (tests use this to compare).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import os
from pathlib import Path

import torch

_ABI_VERSION = 2


class UpdateTask(ctypes.Structure):
    _fields_ = [
        ("param", ctypes.c_void_p),
        ("grad", ctypes.c_void_p),
        ("index", ctypes.c_void_p),
        ("exp_avg", ctypes.c_void_p),
        ("exp_avg_sq", ctypes.c_void_p),
        ("numel", ctypes.c_int64),
        ("chunk_size", ctypes.c_int64),
        ("k", ctypes.c_int64),
        ("k_last", ctypes.c_int64),
        ("index_bytes", ctypes.c_int32),
        ("state_bytes", ctypes.c_int32),
        ("decay", ctypes.c_float),
        ("one_minus_beta1", ctypes.c_float),
        ("beta2", ctypes.c_float),
        ("one_minus_beta2", ctypes.c_float),
        ("eps", ctypes.c_float),
        ("step_size", ctypes.c_float),
        ("bias_correction2_sqrt", ctypes.c_float),
        ("new_m_scale", ctypes.c_float),
        ("new_v_scale", ctypes.c_float),
    ]


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
        ("old_index_bytes", ctypes.c_int32),
        ("key_source", ctypes.c_int32),
        ("index", ctypes.c_void_p),
        ("exp_avg", ctypes.c_void_p),
        ("exp_avg_sq", ctypes.c_void_p),
        ("k", ctypes.c_int64),
        ("k_last", ctypes.c_int64),
        ("index_bytes", ctypes.c_int32),
        ("state_bytes", ctypes.c_int32),
        ("filter_with_old_mask", ctypes.c_int32),
        ("pad_", ctypes.c_int32),
    ]


KEY_SOURCES = {"small_weights": 0, "large_weights": 1, "large_gradients": 2}


def _library_path() -> Path | None:
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = here / f"_cpu_kernels{suffix}"
        if candidate.exists():
            return candidate
    return None


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("NANOADAM_DISABLE_CPU_KERNELS", "") not in ("", "0"):
        return None
    path = _library_path()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        return None
    lib.nano_abi_version.restype = ctypes.c_int32
    if lib.nano_abi_version() != _ABI_VERSION:
        return None
    lib.nano_sparse_adamw.argtypes = [ctypes.POINTER(UpdateTask), ctypes.c_int64, ctypes.c_int32]
    lib.nano_sparse_adamw.restype = None
    lib.nano_refresh.argtypes = [ctypes.POINTER(RefreshTask), ctypes.c_int64, ctypes.c_int32]
    lib.nano_refresh.restype = None
    return lib


def available() -> bool:
    """True when the compiled CPU kernels are installed and loadable."""
    return _library() is not None


def sparse_adamw(tasks: list[UpdateTask]) -> None:
    if not tasks:
        return
    lib = _library()
    array = (UpdateTask * len(tasks))(*tasks)
    lib.nano_sparse_adamw(array, len(tasks), torch.get_num_threads())


def refresh(tasks: list[RefreshTask]) -> None:
    if not tasks:
        return
    lib = _library()
    array = (RefreshTask * len(tasks))(*tasks)
    lib.nano_refresh(array, len(tasks), torch.get_num_threads())
