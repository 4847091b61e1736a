"""Peak training memory of step-in-backward NanoAdam against fused AdamW and ordinary NanoAdam.

Each (setting, optimizer) runs in a fresh Python process: after imports the resident size is
read (``VmRSS``), then the model is built, trained for a few full steps (forward, backward, step),
and the peak resident size (``VmHWM``) is read. Reported: the peak training memory (peak minus the
resident size before the model existed: parameters + gradients + optimizer state + activations)
and the increase over the loaded model. Linux only (``/proc/self/status``).

Settings: ``llama`` (a LLaMA-style decoder built from a ``transformers`` config, random weights,
gradient checkpointing, batch 1 x 512 tokens: weights dominate, as in the paper's LLM runs) and
``minilm`` (the offline MiniLM-L6 at batch 32 x 128: activations dominate).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field

import torch

from .._io import DEFAULT_MMAP_THRESHOLD, allocator_note, measurement_env, reset_peak_rss, status_kb
from .._models import checkpoint_activations

OPTIMIZERS = ("adamw", "nanoadam", "nanoadam-in-backward")
LLAMA = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
             num_key_value_heads=16, max_position_embeddings=1024, tie_word_embeddings=False)


@dataclass
class BackwardBenchConfig:
    settings: list[str] = field(default_factory=lambda: ["llama", "minilm"])
    optimizers: list[str] = field(default_factory=lambda: list(OPTIMIZERS))
    steps: int = 2
    threads: int = 2
    density: float = 0.1
    mmap_threshold: int | None = DEFAULT_MMAP_THRESHOLD  # see nanoadam_lab._io.measurement_env


def _build(setting: str):
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    gen = torch.Generator().manual_seed(0)
    if setting == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**LLAMA))
        checkpoint_activations(model)
        model.config.use_cache = False
        ids = torch.randint(0, LLAMA["vocab_size"], (1, 512), generator=gen)
        return model, {"input_ids": ids, "labels": ids}
    if setting == "minilm":
        from .optimizers import load_model, synthetic_batch

        model = load_model()
        return model, synthetic_batch(model, 32, 128, 0)
    raise ValueError(f"unknown setting {setting!r}")


def _worker(setting: str, optimizer: str, steps: int, threads: int, density: float) -> dict:
    from nanoadam.grouping import param_groups
    from nanoadam.optimizer import NanoAdam

    torch.set_num_threads(threads)
    before_model = status_kb("VmRSS")
    reset_peak_rss()
    model, batch = _build(setting)
    model.train()
    loaded = status_kb("VmRSS")
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    else:
        opt = NanoAdam(param_groups(model), lr=1e-5, density=density)
        if optimizer == "nanoadam-in-backward":
            opt.step_in_backward()
    for _ in range(steps):
        model(**batch).loss.backward()
        if optimizer != "nanoadam-in-backward":
            opt.step()
            opt.zero_grad(set_to_none=True)
    peak = status_kb("VmHWM")
    params = sum(p.numel() for p in model.parameters())
    return {"setting": setting, "optimizer": optimizer, "params": params,
            "peak_training_mb": (peak - before_model) / 1024, "model_mb": (loaded - before_model) / 1024,
            "increase_over_model_mb": (peak - loaded) / 1024}


def run(config: BackwardBenchConfig, progress=None) -> dict:
    rows = []
    for setting in config.settings:
        for optimizer in config.optimizers:
            cmd = [sys.executable, "-m", "nanoadam_lab.bench.backward", setting, optimizer, str(config.steps),
                   str(config.threads), str(config.density)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=measurement_env(config.mmap_threshold),
                                  timeout=3600)
            if proc.returncode != 0:
                raise RuntimeError(f"{setting}/{optimizer} failed: {proc.stderr.strip().splitlines()[-1:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            if progress is not None:
                progress(rows[-1])
    for row in rows:
        base = next(r for r in rows if r["setting"] == row["setting"] and r["optimizer"] == "adamw")
        row["peak_vs_adamw"] = row["peak_training_mb"] / base["peak_training_mb"]
    from ..experiment import machine_info

    return {"config": asdict(config), "rows": rows, "machine": machine_info()}


def format_table(result: dict) -> str:
    lines = ["| setting | optimizer | parameters | peak training memory (MB) | x fused AdamW | model (MB) | "
             "increase over model (MB) |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['setting']} | {r['optimizer']} | {r['params'] / 1e6:.0f} M | {r['peak_training_mb']:.0f} | "
                     f"{r['peak_vs_adamw']:.2f} | {r['model_mb']:.0f} | {r['increase_over_model_mb']:.0f} |")
    lines += ["", "llama: LLaMA-style decoder (hidden 1024, 24 layers, untied head), random weights, gradient "
              "checkpointing, batch 1 x 512 tokens. minilm: all-MiniLM-L6-v2, batch 32 x 128. Peak training memory = "
              "peak resident size minus the resident size before the model was built; each row a fresh process; "
              f"{result['config']['steps']} training steps; NanoAdam density {result['config']['density']}; "
              + allocator_note(result['config'].get('mmap_threshold'))]
    return "\n".join(lines)


if __name__ == "__main__":
    setting, optimizer, steps, threads, density = sys.argv[1:6]
    print(json.dumps(_worker(setting, optimizer, int(steps), int(threads), float(density))))
