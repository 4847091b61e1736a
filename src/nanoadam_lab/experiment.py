"""The one shape every experiment here shares (DESIGN.md section 8).

An experiment is a module with a dataclass config, ``run(config) -> result`` (a JSON-serializable
dict, with the command, machine and date that produced it) and ``render(result, out_dir)``, which
writes Markdown tables and figures from a result read back from disk. Rendering writes numbers
and settings; what a result means is written by a person in the results folder's README.md.
This module holds what they all use: provenance, strict JSON written atomically, tables, figures.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ._io import atomic_write_text


def machine_info() -> dict[str, Any]:
    """What produced a result: date (UTC), torch, threads, CPU model, platform, whether the
    compiled CPU kernels were loaded."""
    from nanoadam import _cpu

    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "processor": _cpu_model(),
        "platform": platform.platform(),
        "cpu_kernels": _cpu.available(),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def jsonable(obj: Any) -> Any:
    """``obj`` as strict JSON can hold it: non-finite floats become None, tuples lists, dtypes
    names, dataclasses dicts, keys strings."""
    if is_dataclass(obj) and not isinstance(obj, type):
        obj = asdict(obj)
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_result(out_dir: str | os.PathLike, name: str, result: dict) -> Path:
    """``out_dir/name.json``, strict JSON, written atomically."""
    path = Path(out_dir) / f"{name}.json"
    atomic_write_text(path, json.dumps(jsonable(result), indent=1, allow_nan=False) + "\n")
    return path


def read_result(out_dir: str | os.PathLike, name: str) -> dict:
    return json.loads((Path(out_dir) / f"{name}.json").read_text())


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def settings_table(settings: dict[str, Any]) -> str:
    """A config rendered as a two-column table (nested values as JSON)."""
    return markdown_table(["setting", "value"], [
        (f"`{k}`", json.dumps(jsonable(v)) if isinstance(v, (dict, list, tuple)) else v) for k, v in settings.items()])


def provenance_lines(result: dict) -> list[str]:
    """The command, machine and date of a result, as the first lines of its Markdown."""
    lines = []
    if result.get("command"):
        lines.append(f"Command: `{result['command']}`")
    machine = result.get("machine") or result.get("environment") or {}
    if machine:
        parts = [machine.get("processor") or machine.get("machine"),
                 f"{machine['threads']} threads" if machine.get("threads") else None,
                 f"torch {machine['torch']}" if machine.get("torch") else None, machine.get("platform")]
        lines.append("Machine: " + ", ".join(p for p in parts if p) + f"; date: {machine.get('date', 'not recorded')}")
    elapsed = result.get("elapsed_s", result.get("seconds"))
    if elapsed is not None:
        lines.append(f"Wall time: {elapsed:.0f} s")
    return [line + "  " for line in lines] + [""]


def write_markdown(out_dir: str | os.PathLike, name: str, title: str, result: dict, sections: Iterable[str]) -> Path:
    """``out_dir/name.md``: the title, the result's provenance, then ``sections`` (tables, figure
    links), written atomically."""
    path = Path(out_dir) / f"{name}.md"
    atomic_write_text(path, "\n".join([f"# {title}", "", *provenance_lines(result), *sections]).rstrip() + "\n")
    return path


def pyplot():
    """matplotlib's pyplot on the file-only backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Saves and closes ``fig`` (PNG, written atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    pyplot().close(fig)
    os.replace(tmp, path)
    return path


def percent(x: float | None, digits: int = 2) -> str:
    """A fraction as a percentage with ``digits`` decimals; "-" for None or NaN."""
    return "-" if x is None or x != x else f"{100 * x:.{digits}f}"


def percent_mean_std(values: Iterable[float | None], digits: int = 2) -> str:
    """``mean ± std`` of fractions as percentages (None left out; one value alone; "-" for none)."""
    xs = [x for x in values if x is not None]
    if len(xs) < 2:
        return percent(xs[0], digits) if xs else "-"
    return f"{100 * statistics.fmean(xs):.{digits}f} ± {100 * statistics.stdev(xs):.{digits}f}"


def percent_interval(d: dict | None, digits: int = 2, with_verdict: bool = True) -> str:
    """A judged difference (``analysis.stats.judged_difference``) as percentage points:
    ``mean [lo, hi] verdict``; below two seeds the mean and n; "-" for none."""
    if not d or d.get("mean") is None or d["mean"] != d["mean"]:
        return "-"
    if d["n"] < 2 or d.get("lo") is None or d["lo"] != d["lo"]:
        return f"{100 * d['mean']:+.{digits}f} (n = {d['n']})"
    text = f"{100 * d['mean']:+.{digits}f} [{100 * d['lo']:+.{digits}f}, {100 * d['hi']:+.{digits}f}]"
    return f"{text} {d['verdict']}" if with_verdict and "verdict" in d else text


def mean_std(stats: dict, digits: str = ".3g") -> str:
    """``mean ± std`` of a ``{"mean", "std"}`` dict."""
    return f"{format(stats['mean'], digits)} ± {format(stats['std'], '.2g')}"


def run_and_render(run: Callable[[Any], dict], render: Callable[[dict, str], list], config: Any, out_dir: str,
                   name: str) -> list:
    """The experiment's whole job: run, write the result, read it back, render from it."""
    result = run(config)
    write_result(out_dir, name, result)
    return [Path(out_dir) / f"{name}.json", *render(read_result(out_dir, name), out_dir)]
