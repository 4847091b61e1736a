"""``nanoadam sft``: supervised finetuning of a causal LM, ``run(SFTConfig) -> dict``.

The same plain loop as the GLUE path, for any ``AutoModelForCausalLM``: every registry optimizer,
the shared recipe (warmup, linear decay, clipping; per-tensor clipping in step-in-backward mode,
where global clipping cannot work), loss on answer tokens only (``sft_data.encode_example``), bf16
weights (NanoAdam then writes them back with stochastic rounding), gradient checkpointing, LoRA,
and NanoAdam's step in backward. After training, greedy generation on the evaluation rows is
scored as the format says (``sft_data``): exact match of GSM8K's final number, the commonsense
answer word, or the stripped answer.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._io import reset_peak_rss, status_kb
from .._models import checkpoint_activations
from ..baselines import build_optimizer
from .recipe import Recipe, shuffled_batches
from .sft_data import encode_example, load_rows, sft_format

# The paper's LLM settings (Appendix H: GSM8K 3 epochs, global batch 32, length 512; the
# commonsense runs likewise), for a GPU; the default is a CPU-sized smoke budget.
BUDGETS: dict[str, dict[str, Any]] = {
    "paper": dict(epochs=3.0, batch_size=32, max_length=512, max_new_tokens=256, bf16=True,
                  gradient_checkpointing=True),
    "quick": dict(epochs=1.0, batch_size=8, max_length=256, max_new_tokens=64, train_limit=512, eval_limit=64),
}


@dataclass
class SFTConfig:
    model: str  # a hub name or a local folder of an AutoModelForCausalLM (with its tokenizer)
    optimizer: str = "nanoadam"
    lr: float = 1e-4
    format: str = "gsm8k"  # gsm8k, commonsense or instruction
    train: str = "openai/gsm8k:main"  # a hub dataset ("name:config"), a JSON Lines file or a folder
    train_split: str = "train"
    eval: str | None = None  # default: the train source
    eval_split: str = "test"
    instruction_field: str = "instruction"  # the instruction format's fields
    answer_field: str = "answer"
    train_limit: int | None = None
    eval_limit: int | None = 200
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    max_length: int = 256
    max_new_tokens: int = 64
    seed: int = 0
    bf16: bool = False
    gradient_checkpointing: bool = False
    step_in_backward: bool = False
    lora_r: int | None = None
    warmup_fraction: float = 0.06
    clip_norm: float | None = 1.0
    optimizer_overrides: dict[str, Any] = field(default_factory=dict)
    threads: int = 2

    def __post_init__(self):
        sft_format(self.format, self.instruction_field, self.answer_field)  # validates
        if not self.lr > 0:
            raise ValueError(f"Invalid lr: {self.lr} (expected > 0)")
        Recipe(self.warmup_fraction, self.clip_norm)


def load_causal_lm(config: SFTConfig):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    dtype = torch.bfloat16 if config.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(config.model, dtype=dtype)
    if config.gradient_checkpointing:
        checkpoint_activations(model)
    if config.lora_r:
        from peft import LoraConfig, TaskType, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=config.lora_r,
                                                 lora_alpha=config.lora_r, lora_dropout=0.0,
                                                 target_modules="all-linear"))
    return model, tokenizer


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.sep_token_id):
        if candidate is not None:
            return candidate
    return 0


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask, and labels that are -100 on the padding."""
    length = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, (x, y) in enumerate(examples):
        ids[row, :len(x)] = torch.tensor(x)
        labels[row, :len(y)] = torch.tensor(y)
        mask[row, :len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations of each prompt (one at a time: no padding to get wrong)."""
    model.eval()
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")
        ids.pop("token_type_ids", None)
        tokens = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=_pad_id(tokenizer))
        out.append(tokenizer.decode(tokens[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    model.train()
    return out


def _save_checkpoint(path: Path, step: int, model, bundle, schedule, losses, step_times) -> None:
    """Everything a resumed run needs to continue bit for bit, as tensors and plain containers
    (``torch.load(weights_only=True)`` reads it): weights, optimizer, LR and density schedules,
    the dropout generator, the step and the curves so far."""
    state = {"step": step, "model": model.state_dict(), "optimizer": bundle.optimizer.state_dict(),
             "schedule": schedule.state_dict(),
             "schedulers": [sch.state_dict() for sch in bundle.schedulers], "rng": torch.get_rng_state(),
             "losses": losses, "step_times": step_times}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def run(config: SFTConfig, progress=None, checkpoint: str | os.PathLike | None = None,
        save_every: int | None = None) -> dict:
    """Trains and scores once. With ``checkpoint``, saves there every ``save_every`` steps and, when
    the file exists at the start, resumes from it (bit for bit: the same result as an
    uninterrupted run)."""
    torch.set_num_threads(config.threads)
    fmt = sft_format(config.format, config.instruction_field, config.answer_field)
    train_rows = load_rows(config.train, config.train_split, fmt, config.train_limit)
    eval_rows = load_rows(config.eval or config.train, config.eval_split, fmt, config.eval_limit)
    torch.manual_seed(config.seed)
    model, tokenizer = load_causal_lm(config)
    examples = [encode_example(tokenizer, fmt.prompt(r), fmt.target(r), config.max_length) for r in train_rows]
    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    bundle = build_optimizer(config.optimizer, model, lr=config.lr, total_steps=total_steps,
                             **config.optimizer_overrides)
    recipe = Recipe(config.warmup_fraction, config.clip_norm)
    schedule = recipe.scheduler(bundle.optimizer, total_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if config.step_in_backward and not hasattr(bundle.optimizer, "step_in_backward"):
        raise ValueError(f"step_in_backward needs NanoAdam; {config.optimizer} has no such mode")
    pad_id = _pad_id(tokenizer)
    batches = shuffled_batches(len(examples), config.batch_size, config.seed)
    losses, step_times, first = [], [], 1
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    if checkpoint is not None and checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(saved["model"])
        bundle.optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        for sch, state in zip(bundle.schedulers, saved["schedulers"]):
            sch.load_state_dict(state)
        torch.set_rng_state(saved["rng"])
        losses, step_times, first = list(saved["losses"]), list(saved["step_times"]), saved["step"] + 1
        for _ in range(saved["step"]):  # the batches already trained on
            next(batches)
    if config.step_in_backward:  # hooks go on after any load (a load replaces the optimizer's state)
        bundle.optimizer.step_in_backward(max_grad_norm_per_tensor=config.clip_norm)
    rss_before = status_kb("VmRSS")
    peak_ok = reset_peak_rss()
    model.train()
    started = time.perf_counter()
    for step in range(first, total_steps + 1):
        t0 = time.perf_counter()
        loss = model(**collate([examples[i] for i in next(batches)], pad_id)).loss
        loss.backward()
        if not config.step_in_backward:
            recipe.clip(trainable)
            bundle.step()
            bundle.optimizer.zero_grad(set_to_none=True)
        else:
            for scheduler in bundle.schedulers:
                scheduler.step()
        schedule.step()
        losses.append(loss.item())
        step_times.append(time.perf_counter() - t0)
        if not math.isfinite(losses[-1]):
            break
        if checkpoint is not None and save_every and step % save_every == 0 and step < total_steps:
            _save_checkpoint(checkpoint, step, model, bundle, schedule, losses, step_times)
        if progress is not None:
            progress(step, total_steps)
    train_seconds = time.perf_counter() - started
    peak = status_kb("VmHWM") if peak_ok else None
    generations = generate_answers(model, tokenizer, [fmt.prompt(r) for r in eval_rows], config.max_new_tokens)
    answers = [fmt.extract(g) for g in generations]
    references = [fmt.reference(r) for r in eval_rows]
    correct = [a is not None and a == ref for a, ref in zip(answers, references)]
    return {
        "config": asdict(config),
        "accuracy": sum(correct) / len(correct) if correct else float("nan"),
        "eval_examples": len(correct),
        "train_examples": len(examples),
        "answer_tokens": sum(sum(t != -100 for t in y) for _, y in examples),
        "steps": len(losses),
        "loss_curve": losses,
        "median_step_s": statistics.median(step_times),
        "train_seconds": train_seconds,
        "peak_memory_increase_mb": (peak - rss_before) / 1024 if peak and rss_before else None,
        "samples": [{"reference": ref, "answer": a, "generation": g}
                    for ref, a, g in list(zip(references, answers, generations))[:20]],
        "optimizer_hyperparameters": bundle.hyperparameters,
    }
