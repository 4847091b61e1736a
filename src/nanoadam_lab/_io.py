"""Small shared helpers for results on disk and for reading this process's memory (Linux)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and a rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def atomic_write_json(path: str | os.PathLike, data: Any, **dumps_kwargs: Any) -> None:
    dumps_kwargs.setdefault("indent", 1)
    atomic_write_text(path, json.dumps(data, **dumps_kwargs) + "\n")


def status_kb(field: str) -> int | None:
    """A ``/proc/self/status`` field in kB (``VmRSS``, ``VmHWM``), or None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


DEFAULT_MMAP_THRESHOLD = 128 * 1024


def measurement_env(mmap_threshold: int | None = DEFAULT_MMAP_THRESHOLD) -> dict[str, str]:
    """Environment for a fresh process whose peak resident size is measured.

    glibc raises its mmap threshold each time a large mmapped block is freed, so after the first
    training step large tensors come from the brk heap; persistent allocations made between them
    (optimizer state created inside backward, say) then fragment it, and the peak resident size
    depends on allocation order, not on what the tensors need (measured: +600 MB on MiniLM for
    step-in-backward at step 2, gone with a fixed threshold). A fixed ``MALLOC_MMAP_THRESHOLD_``
    gives every large tensor its own mapping, returned to the system when freed, for every
    optimizer alike. ``None`` keeps glibc's default.
    """
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(int(mmap_threshold))
    return env


def allocator_note(mmap_threshold: int | None) -> str:
    """One sentence for a results table saying how the allocator was set."""
    if mmap_threshold is None:
        return "glibc's default (dynamic) mmap threshold."
    return (f"MALLOC_MMAP_THRESHOLD_={mmap_threshold} in every measured process, so that heap fragmentation "
            "does not decide the peak (see nanoadam_lab._io.measurement_env).")


def reset_peak_rss() -> bool:
    """Resets the peak resident size (``VmHWM``) to the current one; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
