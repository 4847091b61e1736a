"""End-to-end training step time on a LLaMA-style decoder: NanoAdam against fused AdamW.

Two copies of the same randomly initialized decoder (``transformers.LlamaForCausalLM``, float32,
batch 1 x 512 random tokens), one trained by each optimizer as the registry builds it. They take
turns in blocks of ``steps_per_block`` whole steps (forward, backward, optimizer step, zero_grad),
so that a machine that speeds up or slows down shifts both alike; the ratio is the median over
blocks of (NanoAdam's median step / AdamW's median step in the same round). The first block of
each is a warm-up and is not counted.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from ..baselines import build_optimizer
from ..experiment import machine_info

# About 134 M parameters: hidden 768, 12 layers, SwiGLU 2048, 32k vocabulary, untied head.
DECODER = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
               num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=1024, tie_word_embeddings=False)


@dataclass
class DecoderBenchConfig:
    optimizers: list[str] = field(default_factory=lambda: ["adamw", "nanoadam"])
    decoder: dict = field(default_factory=lambda: dict(DECODER))
    seq: int = 512
    blocks: int = 5
    steps_per_block: int = 3
    threads: int = 2
    lr: float = 1e-4


def run(config: DecoderBenchConfig, progress=None) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(config.threads)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.decoder["vocab_size"], (1, config.seq), generator=gen)
    runners = {}
    for name in config.optimizers:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**config.decoder))
        runners[name] = (model, build_optimizer(name, model, lr=config.lr, total_steps=10_000))
    params = sum(p.numel() for p in next(iter(runners.values()))[0].parameters())
    times: dict[str, list[list[float]]] = {name: [] for name in runners}
    for block in range(config.blocks + 1):
        for name, (model, bundle) in runners.items():
            block_times = []
            for _ in range(config.steps_per_block):
                t0 = time.perf_counter()
                model(input_ids=ids, labels=ids).loss.backward()
                bundle.step()
                bundle.optimizer.zero_grad(set_to_none=True)
                block_times.append(time.perf_counter() - t0)
            if block:  # block 0 warms up
                times[name].append(block_times)
            if progress is not None:
                progress(block, name)
    reference = config.optimizers[0]
    rows = {}
    for name in runners:
        medians = [statistics.median(b) for b in times[name]]
        ratios = [statistics.median(b) / statistics.median(r) for b, r in zip(times[name], times[reference])]
        rows[name] = {"median_step_s": statistics.median(medians), "block_medians_s": medians,
                      f"ratio_to_{reference}": statistics.median(ratios), "block_ratios": ratios}
    return {"config": asdict(config), "params": params, "results": rows, "machine": machine_info()}


def format_table(result: dict) -> str:
    reference = result["config"]["optimizers"][0]
    lines = [f"| optimizer | median step (s) | x {reference} (median of paired blocks) | per block |",
             "|---|---|---|---|"]
    for name, r in result["results"].items():
        blocks = ", ".join(f"{x:.3f}" for x in r["block_ratios"])
        lines.append(f"| {name} | {r['median_step_s']:.3f} | {r[f'ratio_to_{reference}']:.3f} | {blocks} |")
    c = result["config"]
    lines += ["", f"LLaMA-style decoder, {result['params'] / 1e6:.0f} M parameters, float32, batch 1 x {c['seq']}, "
              f"{c['blocks']} blocks of {c['steps_per_block']} whole steps each (forward, backward, step), "
              "optimizers taking turns; one warm-up block not counted."]
    return "\n".join(lines)
