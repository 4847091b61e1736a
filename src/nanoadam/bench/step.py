"""Step-time benchmark: NanoAdam against ``torch.optim.AdamW`` (fused and foreach) in one process.

Parameters are shaped like MiniLM-L6 (BERT, hidden 384, 6 layers, vocabulary 30522) and given
fixed random gradients. Optimizers run alternately in blocks of ``mask_interval`` steps, so every
NanoAdam block holds exactly one mask refresh; each figure is the median over blocks. Timing is
per ``step()`` call (``time.perf_counter``); nothing else runs inside the timed region.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import torch

from .. import _cpu
from ..optimizer import NanoAdam


def minilm_shapes(vocab: int = 30522, hidden: int = 384, layers: int = 6, ffn: int = 1536,
                  positions: int = 512) -> list[tuple[int, ...]]:
    """Parameter shapes of a BERT encoder like all-MiniLM-L6-v2 (22.7 M entries by default)."""
    shapes: list[tuple[int, ...]] = [(vocab, hidden), (positions, hidden), (2, hidden), (hidden,), (hidden,)]
    for _ in range(layers):
        shapes += [(hidden, hidden), (hidden,)] * 4  # query, key, value, attention output
        shapes += [(hidden,), (hidden,)]  # attention LayerNorm
        shapes += [(ffn, hidden), (ffn,), (hidden, ffn), (hidden,)]  # feed-forward
        shapes += [(hidden,), (hidden,)]  # output LayerNorm
    return shapes


@dataclass
class StepBenchConfig:
    density: float = 0.1
    mask_interval: int = 100
    chunk_size: int = 4096
    lr: float = 1e-4
    blocks: int = 5
    foreach_steps: int = 10  # foreach AdamW is slow on CPU: fewer steps per block
    threads: int = 2
    seed: int = 0
    include_reference: bool = True  # also time NanoAdam's eager reference path (fused=False)
    shapes: list[tuple[int, ...]] = field(default_factory=minilm_shapes)


def _make_params(shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.05)
        p.grad = torch.randn(shape, generator=gen) * 1e-3
        params.append(p)
    return params


def _clone_params(params):
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = p.grad.clone()
        out.append(q)
    return out


def _time_steps(opt, n):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times


def run(config: StepBenchConfig, progress=None) -> dict:
    """Runs the benchmark and returns a JSON-serializable result (times in milliseconds)."""
    torch.set_num_threads(config.threads)
    base = _make_params(config.shapes, config.seed)
    numel = sum(p.numel() for p in base)
    nano_kw = dict(lr=config.lr, density=config.density, mask_interval=config.mask_interval,
                   chunk_size=config.chunk_size)
    optimizers = {
        "adamw_fused": torch.optim.AdamW(_clone_params(base), lr=config.lr, fused=True),
        "adamw_foreach": torch.optim.AdamW(_clone_params(base), lr=config.lr, foreach=True),
        "nanoadam": NanoAdam(_clone_params(base), **nano_kw),
    }
    if config.include_reference:
        optimizers["nanoadam_reference"] = NanoAdam(_clone_params(base), **nano_kw, fused=False)
    del base
    # Warm-up: one step each (NanoAdam's first step makes the first masks: timed separately).
    first_refresh_ms = {}
    for name, opt in optimizers.items():
        first_refresh_ms[name] = _time_steps(opt, 1)[0] * 1e3
    blocks = {name: [] for name in optimizers}
    # Blocks start right after a refresh step; realign NanoAdam so that each block starts with one.
    for name, opt in optimizers.items():
        if name.startswith("nanoadam"):
            _time_steps(opt, config.mask_interval - 1)
    for b in range(config.blocks):
        for name, opt in optimizers.items():
            if name == "nanoadam_reference" and b > 0:
                continue  # one block is enough for the slow reference path
            n = config.foreach_steps if name == "adamw_foreach" else config.mask_interval
            blocks[name].append(_time_steps(opt, n))
        if progress is not None:
            progress(b + 1, config.blocks)

    def summary(name):
        per_block = blocks[name]
        amortized = statistics.median(sum(ts) / len(ts) for ts in per_block)
        out = {"amortized_step_ms": amortized * 1e3, "blocks": len(per_block)}
        if name.startswith("nanoadam"):
            refresh_step = statistics.median(ts[0] for ts in per_block)
            plain = statistics.median(statistics.median(ts[1:]) for ts in per_block)
            out.update(refresh_step_ms=refresh_step * 1e3, plain_step_ms=plain * 1e3,
                       refresh_only_ms=(refresh_step - plain) * 1e3,
                       state_bytes_per_param=optimizers[name].state_bytes() / numel)
        else:
            out["state_bytes_per_param"] = _adamw_state_bytes(optimizers[name]) / numel
        out["first_step_ms"] = first_refresh_ms[name]
        return out

    results = {name: summary(name) for name in optimizers}
    fused_ms = results["adamw_fused"]["amortized_step_ms"]
    plain_fused = statistics.median(statistics.median(ts) for ts in blocks["adamw_fused"]) * 1e3
    for r in results.values():
        r["ratio_to_fused_adamw"] = r["amortized_step_ms"] / fused_ms
    nano = results["nanoadam"]
    return {
        "config": {k: v for k, v in asdict(config).items() if k != "shapes"},
        "params": numel,
        "tensors": len(config.shapes),
        "results": results,
        "targets": {
            "amortized_step_vs_fused_adamw": nano["amortized_step_ms"] / fused_ms,
            "refresh_vs_fused_adamw_step": nano["refresh_only_ms"] / plain_fused,
            "state_bytes_per_param": nano["state_bytes_per_param"],
        },
        "machine": machine_info(),
    }


def _adamw_state_bytes(opt) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def machine_info() -> dict:
    import os

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


def format_table(result: dict) -> str:
    rows = ["| optimizer | amortized step (ms) | x fused AdamW | refresh alone (ms) | state bytes/param |",
            "|---|---|---|---|---|"]
    for name, r in result["results"].items():
        refresh = f"{r['refresh_only_ms']:.1f}" if "refresh_only_ms" in r else "-"
        rows.append(f"| {name} | {r['amortized_step_ms']:.2f} | {r['ratio_to_fused_adamw']:.2f} | {refresh} | "
                    f"{r['state_bytes_per_param']:.3f} |")
    t = result["targets"]
    rows.append("")
    rows.append(f"NanoAdam amortized step = {t['amortized_step_vs_fused_adamw']:.2f}x fused AdamW (target <= 1.0); "
                f"one refresh = {t['refresh_vs_fused_adamw_step']:.2f}x one fused AdamW step (target <= 3); "
                f"state = {t['state_bytes_per_param']:.3f} bytes/param (target <= 0.62).")
    return "\n".join(rows)
