"""Step-time benchmark: NanoAdam against ``torch.optim.AdamW`` (fused and foreach) in one process.

Parameters are shaped like MiniLM-L6 (BERT, hidden 384, 6 layers, vocabulary 30522) and given
fixed random gradients. The optimizers take turns *step by step* (fused AdamW, then NanoAdam, then
the other way round), so the machine's drift, which moves blocks of a hundred steps by tens of
percent on a shared 2-core machine, shifts both alike; every figure is a ratio of steps taken side
by side. A block is ``mask_interval`` steps and holds exactly one NanoAdam refresh: the amortized
ratio of a block is NanoAdam's summed step time over fused AdamW's, and the reported figure is
the median over blocks. The slow peers (foreach AdamW, NanoAdam's eager reference path) are paired
with fused AdamW the same way over fewer steps. Timing is per ``step()`` call
(``time.perf_counter``); nothing else runs inside the timed region.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from nanoadam.optimizer import NanoAdam

from ..experiment import machine_info


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


def _timed_step(opt) -> float:
    t0 = time.perf_counter()
    opt.step()
    return time.perf_counter() - t0


def _take_turns(first, second, n: int) -> tuple[list[float], list[float]]:
    """``n`` steps of each optimizer, one by one, swapping which goes first every step."""
    a, b = [], []
    for i in range(n):
        if i % 2 == 0:
            a.append(_timed_step(first))
            b.append(_timed_step(second))
        else:
            b.append(_timed_step(second))
            a.append(_timed_step(first))
    return a, b


def _blocks(times: list[float], size: int) -> list[list[float]]:
    return [times[i:i + size] for i in range(0, len(times) - size + 1, size)]


def run(config: StepBenchConfig, progress=None) -> dict:
    """Runs the benchmark and returns a JSON-serializable result (times in milliseconds)."""
    torch.set_num_threads(config.threads)
    base = _make_params(config.shapes, config.seed)
    numel = sum(p.numel() for p in base)
    interval = config.mask_interval
    nano_kw = dict(lr=config.lr, density=config.density, mask_interval=interval, chunk_size=config.chunk_size)
    fused = torch.optim.AdamW(_clone_params(base), lr=config.lr, fused=True)
    nano = NanoAdam(_clone_params(base), **nano_kw)
    peers = {"adamw_foreach": torch.optim.AdamW(_clone_params(base), lr=config.lr, foreach=True)}
    if config.include_reference:
        peers["nanoadam_reference"] = NanoAdam(_clone_params(base), **nano_kw, fused=False)
    del base
    # Warm-up: each optimizer's first step (NanoAdam's makes the first masks), then NanoAdam up to
    # the step before a refresh, so that every block starts with a refresh step.
    first_ms = {name: _timed_step(opt) * 1e3 for name, opt in (("adamw_fused", fused), ("nanoadam", nano),
                                                                *peers.items())}
    for opt in [nano] + [o for name, o in peers.items() if name.startswith("nanoadam")]:
        for _ in range(interval - 1):
            opt.step()
    fused_times, nano_times = [], []
    for b in range(config.blocks):
        f, n = _take_turns(fused, nano, interval)
        fused_times += f
        nano_times += n
        if progress is not None:
            progress(b + 1, config.blocks + len(peers))
    results = {"adamw_fused": {"amortized_step_ms": statistics.median(fused_times) * 1e3,
                               "state_bytes_per_param": _adamw_state_bytes(fused) / numel,
                               "ratio_to_fused_adamw": 1.0, "first_step_ms": first_ms["adamw_fused"]}}
    results["nanoadam"] = _nano_summary(nano, _blocks(nano_times, interval), _blocks(fused_times, interval), numel)
    results["nanoadam"]["first_step_ms"] = first_ms["nanoadam"]
    for i, (name, opt) in enumerate(peers.items()):
        steps = interval if name.startswith("nanoadam") else config.foreach_steps
        f, n = _take_turns(fused, opt, steps)
        if name.startswith("nanoadam"):
            results[name] = _nano_summary(opt, [n], [f], numel)
        else:
            results[name] = {"amortized_step_ms": statistics.median(n) * 1e3,
                             "ratio_to_fused_adamw": statistics.median(x / y for x, y in zip(n, f)),
                             "state_bytes_per_param": _adamw_state_bytes(opt) / numel}
        results[name]["first_step_ms"] = first_ms[name]
        if progress is not None:
            progress(config.blocks + i + 1, config.blocks + len(peers))
    summary = results["nanoadam"]
    return {
        "config": {k: v for k, v in asdict(config).items() if k != "shapes"},
        "params": numel,
        "tensors": len(config.shapes),
        "method": "optimizers take turns step by step; ratios are medians over blocks of steps taken side by side",
        "results": results,
        "targets": {
            "amortized_step_vs_fused_adamw": summary["ratio_to_fused_adamw"],
            "refresh_vs_fused_adamw_step": summary["refresh_vs_fused_step"],
            "state_bytes_per_param": summary["state_bytes_per_param"],
        },
        "machine": machine_info(),
    }


def _nano_summary(opt, blocks: list[list[float]], fused_blocks: list[list[float]], numel: int) -> dict:
    """Figures of a NanoAdam whose every block starts with its refresh step, against the fused
    AdamW steps taken alongside."""
    ratio = statistics.median(sum(n) / sum(f) for n, f in zip(blocks, fused_blocks))
    refresh_step = statistics.median(n[0] for n in blocks)
    plain = statistics.median(statistics.median(n[1:]) for n in blocks)
    fused_plain = statistics.median(statistics.median(f) for f in fused_blocks)
    return {
        "amortized_step_ms": statistics.median(sum(n) / len(n) for n in blocks) * 1e3,
        "ratio_to_fused_adamw": ratio,
        "blocks": len(blocks),
        "refresh_step_ms": refresh_step * 1e3,
        "plain_step_ms": plain * 1e3,
        "refresh_only_ms": (refresh_step - plain) * 1e3,
        "refresh_vs_fused_step": (refresh_step - plain) / fused_plain,
        "plain_step_vs_fused": statistics.median(statistics.median(n[1:]) / statistics.median(f[1:])
                                                 for n, f in zip(blocks, fused_blocks)),
        "state_bytes_per_param": opt.state_bytes() / numel,
    }


def _adamw_state_bytes(opt) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def format_table(result: dict) -> str:
    rows = ["| optimizer | amortized step (ms) | x fused AdamW (paired) | refresh alone (ms) | state bytes/param |",
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
