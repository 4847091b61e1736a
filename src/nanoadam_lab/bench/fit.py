"""The largest LLaMA-style decoder each optimizer finetunes within a memory budget.

Measured, not only computed: each probe is a fresh Python process that builds a decoder of one
size (random weights, gradient checkpointing, batch 1 x 512 random tokens) and trains it for a
few whole steps (forward, backward, optimizer step). The parent reads the child's resident size
ten times a second and kills it once it passes the budget; a probe fits when every step finished
and the child's peak resident size (``VmHWM``, the whole process: Python, torch, the model,
gradients, optimizer state, activations) stayed within the budget. Each optimizer's search starts
at the size the formula predicts and walks the ladder of sizes up or down until it has a size
that fits next to one that does not.

The formula printed beside each measurement (``formula_bytes``) is the resident size of the
process before the model (measured) plus weights, gradients (all of them, or, with step in
backward, the largest tensor's), optimizer state (``formulas.layout_formula_bytes`` on the
decoder's shapes) and checkpointed activations (``activation_bytes``). Linux only
(``/proc/<pid>/status``); CPU only.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

from .._io import DEFAULT_MMAP_THRESHOLD, allocator_note, measurement_env
from .._models import checkpoint_activations

# name -> (registry entry, its overrides, step in backward)
VARIANTS: dict[str, tuple[str, dict, bool]] = {
    "adamw": ("adamw", {}, False),
    "adamw8bit": ("adamw8bit", {}, False),
    "galore": ("galore", {}, False),
    "microadam": ("microadam", {}, False),
    "nanoadam": ("nanoadam", {}, False),
    "nanoadam-in-backward": ("nanoadam", {}, True),
    "nanoadam-in-backward-sparse-head": ("nanoadam", {"sparse_head": True}, True),
}
DTYPE_BYTES = {"bfloat16": 2, "float32": 4}
VOCAB = 32000  # LLaMA-2's vocabulary, untied head
LLAMA2_7B_HIDDEN = 4096


def decoder_config(hidden: int) -> dict:
    """LLaMA's shape rules at width ``hidden`` (a multiple of 128): ``hidden / 128`` layers and heads
    of 128, SwiGLU width 8/3 hidden rounded up to 256, 32k vocabulary, untied head. ``hidden=4096``
    is LLaMA-2 7B (32 layers, 11008, 6.74 B parameters)."""
    if hidden < 128 or hidden % 128:
        raise ValueError(f"hidden must be a positive multiple of 128, got {hidden}")
    heads = hidden // 128
    return dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=-(-int(8 * hidden / 3) // 256) * 256,
                num_hidden_layers=hidden // 128, num_attention_heads=heads, num_key_value_heads=heads,
                max_position_embeddings=4096, tie_word_embeddings=False)


def decoder_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter of ``LlamaForCausalLM(cfg)``, in its order."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    shapes = [("model.embed_tokens.weight", (v, h))]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                   (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                   (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                   (p + "mlp.down_proj.weight", (h, i)), (p + "input_layernorm.weight", (h,)),
                   (p + "post_attention_layernorm.weight", (h,))]
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return shapes


def parameter_count(cfg: dict) -> int:
    return sum(math.prod(s) for _, s in decoder_shapes(cfg))


def activation_bytes(cfg: dict, seq: int, weight_bytes: int) -> int:
    """Activations of one checkpointed step at batch 1: every layer's saved input, one layer's
    recomputed activations during its backward (attention projections and scores, the SwiGLU's
    three intermediate tensors, each with its gradient), and the logits (in the weights' dtype, an
    fp32 copy for the loss and its fp32 gradient)."""
    h, i, v, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    saved_inputs = layers * seq * h * weight_bytes
    one_layer = 2 * (seq * (8 * h + 3 * i) + heads * seq * seq) * weight_bytes
    logits = seq * v * (weight_bytes + 4 + 4)
    return saved_inputs + one_layer + logits


def _tensor_infos(cfg: dict, sparse_head: bool):
    from .formulas import TensorInfo

    infos = []
    for name, shape in decoder_shapes(cfg):
        norm = len(shape) == 1
        head = name == "lm_head.weight"
        infos.append(TensorInfo(shape, sparse=not norm and (sparse_head or not head),
                                galore=len(shape) == 2 and "layers." in name))
    return infos


def formula_bytes(variant: str, cfg: dict, *, dtype: str, seq: int, baseline_bytes: int) -> dict:
    """The parts of the predicted peak resident size of a probe, and their total."""
    from ..baselines.registry import REGISTRY
    from .formulas import layout_formula_bytes

    name, overrides, in_backward = VARIANTS[variant]
    wb = DTYPE_BYTES[dtype]
    infos = _tensor_infos(cfg, overrides.get("sparse_head", False))
    n = sum(t.numel for t in infos)
    hyper = {**REGISTRY[name].defaults, **overrides}
    # torch's AdamW and galore-torch keep their moments in the parameters' dtype.
    hyper["moment_bytes"] = wb if name in ("adamw", "galore") else 4
    parts = {"baseline": baseline_bytes, "weights": n * wb,
             "gradients": (max(t.numel for t in infos) if in_backward else n) * wb,
             "state": layout_formula_bytes(name, infos, hyper),
             "activations": activation_bytes(cfg, seq, wb)}
    return {**parts, "total": sum(parts.values())}


@dataclass
class FitConfig:
    memory_gb: float | None = None  # None: the memory available on this machine when it starts
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    dtype: str = "bfloat16"
    seq: int = 512
    steps: int = 2
    threads: int = 2
    min_hidden: int = 256
    max_hidden: int = 8192
    mmap_threshold: int | None = DEFAULT_MMAP_THRESHOLD  # see nanoadam_lab._io.measurement_env

    def __post_init__(self):
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ValueError(f"unknown optimizer(s) {', '.join(unknown) or '(none given)'}; "
                             f"choose from {', '.join(VARIANTS)}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.memory_gb is not None and not self.memory_gb > 0:
            raise ValueError(f"memory_gb must be > 0, got {self.memory_gb}")
        for name in ("seq", "steps", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        decoder_config(self.min_hidden), decoder_config(self.max_hidden)
        if self.min_hidden > self.max_hidden:
            raise ValueError("min_hidden must not exceed max_hidden")

    @property
    def budget_bytes(self) -> int:
        if self.memory_gb is None:  # what the machine has free now, so that the watchdog fires before the system
            return _available_bytes()
        return int(self.memory_gb * 2**30)

    @property
    def ladder(self) -> list[int]:
        return list(range(self.min_hidden, self.max_hidden + 1, 128))


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# -- the child ---------------------------------------------------------------------------------

def _child(variant: str, hidden: int, dtype: str, seq: int, steps: int, threads: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from .._io import status_kb
    from ..baselines import build_optimizer, optimizer_state_bytes

    hf_logging.set_verbosity_error()
    torch.set_num_threads(threads)
    before_model = status_kb("VmRSS") * 1024
    if hidden == 0:  # the runtime alone
        return {"before_model_bytes": before_model, "peak_bytes": status_kb("VmHWM") * 1024}
    name, overrides, in_backward = VARIANTS[variant]
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # built in its dtype: no float32 copy on the way
    try:
        model = LlamaForCausalLM(LlamaConfig(**decoder_config(hidden)))
    finally:
        torch.set_default_dtype(previous)
    checkpoint_activations(model)
    model.config.use_cache = False
    model.train()
    ids = torch.randint(0, VOCAB, (1, seq), generator=torch.Generator().manual_seed(0))
    bundle = build_optimizer(name, model, lr=1e-5, total_steps=1000, **overrides)
    if in_backward:
        bundle.optimizer.step_in_backward()
    losses, times = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if not in_backward:
            bundle.step()
            bundle.optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
    return {"before_model_bytes": before_model, "peak_bytes": status_kb("VmHWM") * 1024,
            "params": sum(p.numel() for p in model.parameters()),
            "state_bytes": optimizer_state_bytes(bundle.optimizer), "losses": losses, "step_s": times}


def _rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def probe(variant: str, hidden: int, config: FitConfig, timeout_s: float = 4 * 3600) -> dict:
    """One child process: trains the decoder of width ``hidden`` under the budget's watchdog.
    A child that fails for another reason than memory raises: it says nothing about the fit."""
    import tempfile

    cmd = [sys.executable, "-m", "nanoadam_lab.bench.fit", variant, str(hidden), config.dtype, str(config.seq),
           str(config.steps), str(config.threads)]
    budget = config.budget_bytes
    row = {"variant": variant, "hidden": hidden, "params": parameter_count(decoder_config(hidden)) if hidden else 0}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:  # files: a full pipe blocks
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=measurement_env(config.mmap_threshold))
        killed_at, started = None, time.monotonic()
        while proc.poll() is None:
            rss = _rss_bytes(proc.pid)
            if rss is not None and rss > budget:
                killed_at = rss
                proc.kill()
                break
            if time.monotonic() - started > timeout_s:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"{variant} at hidden {hidden}: no result after {timeout_s:.0f} s")
            time.sleep(0.1)
        proc.wait()
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if killed_at is not None:
        return {**row, "fits": False, "outcome": f"over budget: killed at {killed_at / 2**30:.2f} GiB"}
    if proc.returncode != 0:
        last = (stderr.strip().splitlines() or ["no message"])[-1]
        if proc.returncode < 0 or "memory" in last.lower():  # killed by the system, or an allocation failed
            return {**row, "fits": False, "outcome": f"out of memory: {last[:200]}"}
        raise RuntimeError(f"{variant} at hidden {hidden} failed (exit code {proc.returncode}): {last}")
    measured = json.loads(stdout.strip().splitlines()[-1])
    fits = measured["peak_bytes"] <= budget
    return {**row, **measured, "fits": fits, "outcome": "fits" if fits else "over budget at the end"}


def run(config: FitConfig, progress=None) -> dict:
    runtime = probe("adamw", 0, config)  # the process before any model: what every probe starts from
    if "before_model_bytes" not in runtime:
        raise RuntimeError(f"could not start a measuring process: {runtime['outcome']}")
    baseline = runtime["before_model_bytes"]
    ladder = config.ladder
    budget = config.budget_bytes
    results = {}
    for variant in config.variants:
        def predicted(hidden, variant=variant):  # bound now: the closures are called within this iteration
            return formula_bytes(variant, decoder_config(hidden), dtype=config.dtype, seq=config.seq,
                                 baseline_bytes=baseline)
        fitting = [h for h in ladder if predicted(h)["total"] <= budget]
        start = fitting[-1] if fitting else ladder[0]
        probes = {}

        def measure(hidden, variant=variant, probes=probes):
            if hidden not in probes:
                probes[hidden] = {**probe(variant, hidden, config), "formula": predicted(hidden)}
                if progress is not None:
                    progress(probes[hidden])
            return probes[hidden]["fits"]

        index = ladder.index(start)
        if measure(start):  # walk up to the first size that does not fit
            while index + 1 < len(ladder) and measure(ladder[index + 1]):
                index += 1
            largest = ladder[index]
            lower_bound = index + 1 == len(ladder)  # the ladder ended before a size failed
        else:
            lower_bound = False  # walk down to the first size that fits
            while index > 0 and not measure(ladder[index - 1]):
                index -= 1
            largest = ladder[index - 1] if index > 0 else None
        results[variant] = {"largest_hidden": largest, "lower_bound": lower_bound,
                            "largest_params": parameter_count(decoder_config(largest)) if largest else None,
                            "formula_largest_hidden": fitting[-1] if fitting else None,
                            "formula_largest_params": parameter_count(decoder_config(fitting[-1])) if fitting else None,
                            "probes": [probes[h] for h in sorted(probes)]}
    reference = results.get("adamw", {}).get("largest_params")
    for r in results.values():
        r["x_adamw"] = r["largest_params"] / reference if reference and r["largest_params"] else None
    llama7b = decoder_config(LLAMA2_7B_HIDDEN)
    check_7b = {v: formula_bytes(v, llama7b, dtype="bfloat16", seq=config.seq, baseline_bytes=0)
                for v in config.variants}
    from ..experiment import machine_info

    return {"config": {**asdict(config), "budget_bytes": budget}, "runtime_bytes": baseline, "results": results,
            "llama2_7b_bf16_formula": {"params": parameter_count(llama7b), "bytes": check_7b},
            "machine": machine_info()}


def _gib(b) -> str:
    return f"{b / 2**30:.2f}"


def format_table(result: dict) -> str:
    c = result["config"]
    budget = c["budget_bytes"]
    lines = [f"Budget: {_gib(budget)} GiB of process memory (peak resident size of the whole process); weights "
             f"{c['dtype']}; batch 1 x {c['seq']}; {c['steps']} training steps a probe; the Python, torch and "
             f"transformers runtime alone takes {_gib(result['runtime_bytes'])} GiB.", "",
             "| optimizer | largest that trains (measured) | x fused AdamW | formula's largest |",
             "|---|---|---|---|"]
    for v, r in result["results"].items():
        measured = (f"{r['largest_params'] / 1e9:.2f} B (hidden {r['largest_hidden']})"
                    if r["largest_hidden"] else "none")
        if r.get("lower_bound"):
            measured = "at least " + measured + ", the ladder's end"
        formula = (f"{r['formula_largest_params'] / 1e9:.2f} B (hidden {r['formula_largest_hidden']})"
                   if r["formula_largest_hidden"] else "none")
        x = f"{r['x_adamw']:.2f}" if r["x_adamw"] else "-"
        lines.append(f"| {v} | {measured} | {x} | {formula} |")
    lines += ["", "Every probe (peak: measured; formula: baseline + weights + gradients + state + activations):", "",
              "| optimizer | hidden | parameters | outcome | peak (GiB) | formula (GiB) "
              "| state measured / formula (GiB) | seconds a step |", "|---|---|---|---|---|---|---|---|"]
    for v, r in result["results"].items():
        for p in r["probes"]:
            peak = _gib(p["peak_bytes"]) if "peak_bytes" in p else "-"
            state = f"{_gib(p['state_bytes'])} / {_gib(p['formula']['state'])}" if "state_bytes" in p else \
                f"- / {_gib(p['formula']['state'])}"
            step = f"{sum(p['step_s']) / len(p['step_s']):.1f}" if "step_s" in p else "-"
            lines.append(f"| {v} | {p['hidden']} | {p['params'] / 1e9:.2f} B | {p['outcome']} | {peak} | "
                         f"{_gib(p['formula']['total'])} | {state} | {step} |")
    seven = result["llama2_7b_bf16_formula"]
    lines += ["", f"LLaMA-2 7B ({seven['params'] / 1e9:.2f} B parameters), bf16 weights, batch 1 x {c['seq']}, "
              "by the formula (runtime, CUDA context and allocator slack not counted), "
              "against one 24 GB GPU (24 GiB):", "",
              "| optimizer | weights | gradients | state | activations | total (GiB) | fits 24 GB |",
              "|---|---|---|---|---|---|---|"]
    for v, parts in seven["bytes"].items():
        fits = "yes" if parts["total"] <= 24 * 2**30 else "no"
        lines.append(f"| {v} | {_gib(parts['weights'])} | {_gib(parts['gradients'])} | {_gib(parts['state'])} | "
                     f"{_gib(parts['activations'])} | {_gib(parts['total'])} | {fits} |")
    lines += ["", "Decoders: LLaMA shape rules (hidden/128 layers and heads, SwiGLU 8/3 hidden, 32k vocabulary, "
              "untied head), random weights, gradient checkpointing. NanoAdam: density 0.1, bf16 moments; "
              "`lm_head` dense (float32 AdamW state, the paper's choice) except in `-sparse-head`. "
              + allocator_note(c.get("mmap_threshold"))]
    return "\n".join(lines)


if __name__ == "__main__":
    variant, hidden, dtype, seq, steps, threads = sys.argv[1:7]
    print(json.dumps(_child(variant, int(hidden), dtype, int(seq), int(steps), int(threads))))
