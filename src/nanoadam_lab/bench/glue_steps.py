"""Step times of a GLUE comparison's optimizers, timed in turn on one machine.

The run files of ``nanoadam compare`` record each run's median step, but the runs were made one
after another over days, next to other background jobs and on different CPUs, so those medians
cannot rank optimizers by speed. This benchmark times each task's optimizers at the rates the
comparison chose, with the comparison's own model, data, batch size, sequence length and recipe:
every optimizer gets its own model (seed 0, as the tuning runs), and they take turns in blocks of
``steps_per_block`` whole training steps (collate, forward, backward, clipping, optimizer step,
schedule, ``zero_grad``: ``glue.training_step``, what a run times), all of them on the same batches
in the same order; the order of the turns rotates from block to block, so that no optimizer
always follows the same one. The first block of each warms up (it holds NanoAdam's first mask
selection) and is not counted. How busy the CPUs were in the second before each task is recorded
(``/proc/stat``): the times mean something only on an otherwise idle machine.

Reported per task and optimizer: the median whole step and the median optimizer step over all
timed steps (the first ``blocks x steps_per_block`` batches after the warm-up, not a whole run),
and the ratio to AdamW, the median over blocks of (its block median / AdamW's block median in the
same round), with the blocks' range. Mask refreshes (every 50 steps at the standard budget) fall outside a
short benchmark's median, as they fall outside a run's; their amortized cost is what
``nanoadam bench`` and ``nanoadam bench step`` measure.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from ..baselines import build_optimizer
from ..experiment import machine_info
from ..experiments.compare import CompareConfig, _tied, summarize
from ..experiments.glue import GlueRunConfig, load_model_and_tokenizer, planned_steps, split_data, training_step
from ..experiments.glue_data import collate, load_task
from ..experiments.recipe import shuffled_batches


@dataclass
class GlueStepsConfig:
    blocks: int = 5
    steps_per_block: int = 4
    reference: str = "adamw"

    def __post_init__(self):
        for name in ("blocks", "steps_per_block"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {name}: {value!r} (expected an integer >= 1)")


def cpu_busy_fraction(seconds: float = 1.0) -> float | None:
    """The fraction of all CPUs' time spent busy over the next ``seconds`` (``/proc/stat``; None
    where there is none). Unlike the load average, which trails by minutes, it shows whether
    another job is running now."""
    def sample():
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle
    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


def chosen_configs(compare: CompareConfig) -> tuple[dict[str, dict[str, GlueRunConfig]], dict[str, str]]:
    """Per task, every optimizer's seed-0 run configuration at the rate the comparison chose
    (``summarize`` of its finished runs); and the tasks left out, with the reason."""
    summary = summarize(compare)
    configs, skipped = {}, {}
    for task in compare.tasks:
        cells = summary["tasks"].get(task, {}).get("cells", {})
        missing = [o for o in compare.optimizers if o not in cells]
        if missing:
            skipped[task] = f"no chosen rate yet for {', '.join(missing)}"
            continue
        chosen = {o: cells[o]["lr"] for o in compare.optimizers}
        configs[task] = {o: compare.run_config(task, o, chosen[o], 0, _tied(compare, o, chosen))
                         for o in compare.optimizers}
    return configs, skipped


def time_task(configs: dict[str, GlueRunConfig], config: GlueStepsConfig, progress=None) -> dict:
    """Times the optimizers of one task (``configs``: optimizer -> its run configuration) in turn."""
    if config.reference not in configs:
        raise ValueError(f"the reference optimizer {config.reference!r} is not among {', '.join(configs)}")
    first = next(iter(configs.values()))
    shared = ("task", "model", "data_dir", "seed", "batch_size", "max_length", "train_limit", "heldout_fraction",
              "eval_split", "eval_limit", "epochs", "max_steps", "threads", "lora_r")
    differing = [k for k in shared if len({repr(getattr(c, k)) for c in configs.values()}) > 1]
    if differing:
        raise ValueError(f"the runs to time must share their data and shape; they differ in {', '.join(differing)}")
    torch.set_num_threads(first.threads)
    busy_before = cpu_busy_fraction()
    rows = load_task(first.spec, first.data_dir)
    steps = (config.blocks + 1) * config.steps_per_block
    trainers, train, total_steps = {}, None, None
    for name, run_config in configs.items():
        torch.manual_seed(run_config.seed)
        model, tokenizer = load_model_and_tokenizer(run_config.model, run_config.spec.num_labels, run_config.lora_r)
        if train is None:  # the same for every run (checked above): split and checked once
            train, _ = split_data(run_config, rows, tokenizer)
            total_steps = planned_steps(run_config, len(train))
            if steps > total_steps:  # past its end the schedule holds the rate at zero
                raise ValueError(f"{config.blocks + 1} blocks of {config.steps_per_block} steps are {steps} steps, "
                                 f"more than the {total_steps} of a {first.task} run")
        bundle = build_optimizer(run_config.optimizer, model, lr=run_config.lr, total_steps=total_steps,
                                 **run_config.optimizer_overrides)
        schedule = run_config.recipe.scheduler(bundle.optimizer, total_steps)
        trainable = [p for p in model.parameters() if p.requires_grad]
        model.train()
        trainers[name] = (model, trainable, bundle, schedule, run_config.recipe, tokenizer.pad_token_id or 0)
    batches = shuffled_batches(len(train), first.batch_size, first.seed)
    order = [next(batches) for _ in range(steps)]
    whole: dict[str, list[list[float]]] = {name: [] for name in trainers}
    optimizer_only: dict[str, list[float]] = {name: [] for name in trainers}
    names = list(trainers)
    for block in range(config.blocks + 1):
        indices = order[block * config.steps_per_block:(block + 1) * config.steps_per_block]
        turns = names[block % len(names):] + names[:block % len(names)]  # rotated every block
        for name in turns:
            model, trainable, bundle, schedule, recipe, pad_id = trainers[name]
            block_times = []
            for batch in indices:
                started = time.perf_counter()
                _, _, optimizer_seconds = training_step(model, collate(train, batch, pad_id), trainable, bundle,
                                                        schedule, recipe)
                block_times.append(time.perf_counter() - started)
                if block:
                    optimizer_only[name].append(optimizer_seconds)
            if block:  # block 0 warms up
                whole[name].append(block_times)
            if progress is not None:
                progress(block, name)
    reference = [statistics.median(b) for b in whole[config.reference]]
    results = {}
    for name, run_config in configs.items():
        medians = [statistics.median(b) for b in whole[name]]
        ratios = [m / r for m, r in zip(medians, reference)]
        results[name] = {"lr": run_config.lr, "optimizer_overrides": run_config.optimizer_overrides,
                         "run_config": asdict(run_config),
                         "median_step_s": statistics.median(t for b in whole[name] for t in b),
                         "median_optimizer_step_s": statistics.median(optimizer_only[name]),
                         "block_medians_s": medians, f"ratio_to_{config.reference}": statistics.median(ratios),
                         "block_ratios": ratios}
    return {"batch_size": first.batch_size, "max_length": first.max_length, "train_examples": len(train),
            "cpu_busy_before": busy_before,
            "results": results, "machine": machine_info()}


def run(compare: CompareConfig, config: GlueStepsConfig, progress=None, earlier: dict | None = None) -> dict:
    """Every task of ``compare`` whose optimizers all have a chosen rate, timed in turn; the tasks
    of ``earlier`` (a previous result of this benchmark) that were not timed now are kept."""
    if config.reference not in compare.optimizers:
        raise ValueError(f"the reference optimizer {config.reference!r} is not among the optimizers "
                         f"({', '.join(compare.optimizers)})")
    configs, skipped = chosen_configs(compare)
    tasks = dict((earlier or {}).get("tasks", {}))
    for task, task_configs in configs.items():
        tasks[task] = time_task(task_configs, config,
                                progress=(lambda block, name, task=task: progress(task, block, name)) if progress
                                else None)
    return {"config": asdict(config), "compare_out": compare.out, "budget": compare.budget, "tasks": tasks,
            "timed_now": list(configs), "skipped": {t: r for t, r in skipped.items() if t not in tasks},
            "machine": machine_info()}


def format_table(result: dict) -> str:
    reference = result["config"]["reference"]
    c = result["config"]
    lines = [f"| task | optimizer | lr | step (s) | x {reference} (median of paired blocks) | blocks' range "
             "| optimizer step (ms) | timed (CPUs busy just before) |", "|---|---|---|---|---|---|---|---|"]
    for task, entry in result["tasks"].items():
        busy = entry.get("cpu_busy_before")
        when = (f"{entry['machine']['date']}, {entry['machine']['processor']} "
                f"({'-' if busy is None else f'{100 * busy:.0f} %'})")
        for name, r in entry["results"].items():
            low, high = min(r["block_ratios"]), max(r["block_ratios"])
            lines.append(f"| {task} | {name} | {r['lr']:g} | {r['median_step_s']:.3f} | "
                         f"{r[f'ratio_to_{reference}']:.3f} | {low:.2f}-{high:.2f} | "
                         f"{1000 * r['median_optimizer_step_s']:.1f} | {when} |")
    lines += ["", f"Whole training steps (collate, forward, backward, clipping, optimizer step, schedule, zero_grad), "
              f"{c['blocks']} blocks of {c['steps_per_block']} steps a task, optimizers taking turns (in an order "
              f"rotated every block) on the same batches at the rates the comparison chose (budget "
              f"`{result['budget']}`); one warm-up block not counted. Medians over the timed steps. Mask refreshes "
              "(every 50 steps) fall outside them: `nanoadam bench` measures their amortized cost."]
    for task, reason in result["skipped"].items():
        lines.append(f"Not timed: {task} ({reason}).")
    return "\n".join(lines)
