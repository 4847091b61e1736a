"""Vision continual finetuning with frontiers (paper Sec. 4, Table 4; DESIGN.md section 5).

The question: at equal success on a new task, does an optimizer keep more of an old one? One
pretrained network (a CNN of about 1.15 M parameters, pretrained with AdamW on digits 0-4 of
scikit-learn's 8x8 ``digits``) is finetuned on task 1 (digits 5-9, new head ``fc``), then on
task 2 (the same images transformed, under another label map, with a new head), and task 1 is
scored again with its own head reloaded. Two second tasks: ``similar`` (rotated by 15 degrees)
and ``dissimilar`` (rotated by 90 degrees, the case the paper's limitations section expects
NanoAdam may lose).

Protocol, the same for every method (a registry optimizer at a density), no one special-cased:

* Every stage uses the recipe (``recipe.Recipe``: 6 % warmup, linear decay, clipping at 1.0;
  the final weights are scored), ``epochs`` epochs of ``batch_size`` on the training images minus
  a held-out slice (``heldout_fraction``, stratified). Seed ``s`` fixes the batch order and the new
  heads' initialization, the same for every method.
* Task-1 rate: the grid rate with the lowest held-out task-1 loss on the first seed (a best rate
  on an edge extends the grid). Every seed then trains task 1 at that rate.
* Task 2 runs over the method's whole grid for every seed (the first seed decides grid
  extensions, by held-out task-2 loss). Each rate is a point of the method's frontier: mean
  task-2 test accuracy against mean task-1 test accuracy after task 2.
* ``head-only`` is the control: the body frozen, only the new heads train, so it shows what the
  pretrained features alone reach on each task and how much task 1 is lost to BatchNorm's running
  statistics, which every method's task-2 forward passes update alike.
* Tuned comparison: the task-2 rate with the lowest mean held-out task-2 loss; per-seed paired
  differences against AdamW (task-2 accuracy, task-1 accuracy after task 2, forgetting) with
  95 % t-intervals; and retention at equal task-2 score against AdamW's frontier
  (``analysis.frontier``). Test images are never used to choose anything.

Task 1 after task 2 is also read by a linear probe refit on the body's features and by the old
head with its offset refit (``task1_refit``, ``refit.py``), both fit on task 1's training images:
the old head alone can fail because the features moved while the body still holds task 1. Run
files made before these measures are computed again when the experiment resumes.

BatchNorm running statistics are buffers, updated by the forward passes of task 2 under every
optimizer alike (as in the paper's ResNets). Runs are written one file each under
``out_dir/runs`` as they finish, and a rerun resumes from them.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import experiment as ex
from .._io import atomic_write_json
from ..baselines import build_optimizer
from ..experiment import percent, percent_interval, percent_mean_std
from .recipe import Recipe, rate_beyond_edge, shuffled_batches

# label -> (registry name, overrides). Densities 1 % and 0.1 % as the paper's vision runs;
# MicroAdam's density is its gradient density.
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "adamw": ("adamw", {}),
    "nanoadam-1%": ("nanoadam", {"density": 0.01}),
    "nanoadam-0.1%": ("nanoadam", {"density": 0.001}),
    "lift-1%": ("lift", {"density": 0.01}),
    "lift-0.1%": ("lift", {"density": 0.001}),
    "microadam-1%": ("microadam", {"density": 0.01}),
    "microadam-0.1%": ("microadam", {"density": 0.001}),
    # the control: the pretrained features alone (body frozen, AdamW on each new head); what it
    # forgets on task 1 is the drift of BatchNorm's running statistics, which every method shares
    "head-only": ("head-only", {}),
}
# Rates a factor ~3 apart; the sparse methods' grids sit ten times higher, as the paper's vision
# runs (Tables 19, 21, 22). Edges extend.
LR_GRIDS: dict[str, tuple[float, ...]] = {
    "adamw": (1e-4, 3e-4, 1e-3, 3e-3),
    "nanoadam": (1e-3, 3e-3, 1e-2, 3e-2),
    "lift": (1e-3, 3e-3, 1e-2, 3e-2),
    "microadam": (1e-4, 3e-4, 1e-3, 3e-3),
    "head-only": (1e-3, 3e-3, 1e-2, 3e-2),
}
TASK2 = {"similar": 15.0, "dissimilar": 90.0}  # rotation in degrees
_STAGE = {"task1": 1, "similar": 2, "dissimilar": 3}  # seeds the batch order and the new head of each stage
REFERENCE = "adamw"


@dataclass
class ContinualConfig:
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    task2: list[str] = field(default_factory=lambda: list(TASK2))
    seeds: int = 10
    first_seed: int = 0
    lr_grids: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(LR_GRIDS))
    max_grid_extensions: int = 2
    mask_interval: int = 50  # NanoAdam and LIFT: 450 steps a task, 9 refreshes
    epochs: float = 30.0
    batch_size: int = 32
    channels: tuple[int, int, int] = (32, 64, 128)
    widths: tuple[int, int] = (1024, 512)  # the body's Linear layers after the convolutions
    pretrain_epochs: int = 30
    pretrain_lr: float = 1e-3
    pretrain_seed: int = 0
    split_seed: int = 0
    test_fraction: float = 0.4
    heldout_fraction: float = 0.15
    label_shift: int = 2  # task-2 label = (task-1 label + shift) % 5
    threads: int = 1

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown method(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(METHODS)}")
        if REFERENCE not in self.methods:
            raise ValueError(f"the methods must include the reference {REFERENCE!r}")
        if not self.task2 or set(self.task2) - set(TASK2):
            raise ValueError(f"task2 takes {' and/or '.join(TASK2)}, got {self.task2!r}")
        if self.seeds < 1 or self.epochs <= 0 or self.batch_size < 1:
            raise ValueError("seeds and batch_size must be >= 1 and epochs > 0")
        for name in {METHODS[m][0] for m in self.methods}:
            grid = self.lr_grids.get(name)
            if not grid or any(not lr > 0 for lr in grid):
                raise ValueError(f"lr_grids[{name!r}] must be a non-empty list of rates > 0")


class DigitsNet(nn.Module):
    """Three conv(3x3, no bias)+BatchNorm+ReLU blocks (max-pool after the 2nd and 3rd), two body
    Linear layers (``neck``) and the ``fc`` head; most parameters sit in the body's Linear layers."""

    def __init__(self, channels=(32, 64, 128), widths=(1024, 512), num_classes: int = 5):
        super().__init__()
        c1, c2, c3 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1, bias=False), nn.BatchNorm2d(c3), nn.ReLU(), nn.MaxPool2d(2))
        w1, w2 = widths
        self.neck = nn.Sequential(nn.Flatten(), nn.Linear(4 * c3, w1), nn.ReLU(), nn.Linear(w1, w2), nn.ReLU())
        self.fc = nn.Linear(w2, num_classes)

    def forward(self, x):
        return self.fc(self.neck(self.features(x)))


def rotate(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotates (N, 1, H, W) images about their centre (bilinear, zeros outside); exact for 90."""
    if degrees % 90 == 0:
        return torch.rot90(images, int(degrees // 90) % 4, dims=(2, 3))
    theta = math.radians(degrees)
    matrix = torch.tensor([[math.cos(theta), -math.sin(theta), 0.0], [math.sin(theta), math.cos(theta), 0.0]])
    grid = nn.functional.affine_grid(matrix.expand(len(images), 2, 3), list(images.shape), align_corners=False)
    return nn.functional.grid_sample(images, grid, align_corners=False)


def stratified_split(labels: torch.Tensor, fraction: float, gen: torch.Generator) -> tuple[list[int], list[int]]:
    """(rest, part) index lists: ``round(fraction * n_c)`` of every class goes to ``part``."""
    rest, part = [], []
    for c in sorted(set(labels.tolist())):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)].tolist()
        n = round(fraction * len(idx))
        part += idx[:n]
        rest += idx[n:]
    return sorted(rest), sorted(part)


class Digits:
    """Pretraining images (digits 0-4), task images (digits 5-9, and their rotations), splits."""

    def __init__(self, cfg: ContinualConfig):
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        pre = y < 5
        self.pre_x, self.pre_y = x[pre], y[pre]
        self.x, self.y = x[~pre], y[~pre] - 5
        gen = torch.Generator().manual_seed(cfg.split_seed)
        train, self.test = stratified_split(self.y, cfg.test_fraction, gen)
        fit, held = stratified_split(self.y[train], cfg.heldout_fraction, gen)
        self.fit, self.heldout = [train[i] for i in fit], [train[i] for i in held]
        self.tasks = {"task1": (self.x, self.y)}
        for kind in cfg.task2:
            self.tasks[kind] = (rotate(self.x, TASK2[kind]), (self.y + cfg.label_shift) % 5)


def pretrain(data: Digits, cfg: ContinualConfig) -> nn.Module:
    torch.manual_seed(cfg.pretrain_seed)
    model = DigitsNet(cfg.channels, cfg.widths)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
    batches = shuffled_batches(len(data.pre_y), cfg.batch_size, cfg.pretrain_seed)
    model.train()
    for _ in range(cfg.pretrain_epochs * math.ceil(len(data.pre_y) / cfg.batch_size)):
        idx = torch.tensor(next(batches))
        loss = nn.functional.cross_entropy(model(data.pre_x[idx]), data.pre_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model


@torch.no_grad()
def evaluate(model: nn.Module, data: Digits, task: str, indices: list[int]) -> dict[str, float]:
    x, y = data.tasks[task]
    idx = torch.tensor(indices)
    model.eval()
    logits = model(x[idx])
    model.train()
    loss = float(nn.functional.cross_entropy(logits, y[idx]))
    return {"accuracy": float((logits.argmax(-1) == y[idx]).float().mean()),
            "loss": loss if math.isfinite(loss) else math.inf}


@torch.no_grad()
def task1_refit(model: nn.Module, data: Digits, indices: list[int]) -> dict[str, float]:
    """Task-1 accuracy on ``indices`` with the current head's offset refit, and with a linear probe
    refit on the body's features (the input of ``fc``), both fit on the training images
    (``refit``: the old head alone can read a readout that no longer fits rather than lost features)."""
    from .refit import LinearProbe, refit_offset

    x, y = data.tasks["task1"]
    model.eval()
    fit_x, eval_x = x[torch.tensor(data.fit)], x[torch.tensor(indices)]
    fit_features, eval_features = model.neck(model.features(fit_x)), model.neck(model.features(eval_x))
    model.train()
    fit_y, eval_y = y[torch.tensor(data.fit)], y[torch.tensor(indices)]
    offset = refit_offset(model.fc(fit_features), fit_y)
    probe = LinearProbe(fit_features, fit_y, model.fc.out_features)
    return {"offset": float(((model.fc(eval_features) + offset).argmax(-1) == eval_y).float().mean()),
            "probe": float((probe.logits(eval_features).argmax(-1) == eval_y).float().mean())}


def train_stage(model: nn.Module, data: Digits, task: str, method: str, lr: float, seed: int,
                cfg: ContinualConfig) -> dict:
    """A new head (seeded), then the recipe with a fresh optimizer on ``task``'s training images."""
    torch.manual_seed(10_000 * seed + _STAGE[task])  # the same new head for every method
    model.fc = nn.Linear(model.fc.in_features, 5)
    name, overrides = METHODS[method]
    if name in ("nanoadam", "lift"):
        overrides = {**overrides, "mask_interval": cfg.mask_interval}
    steps = math.ceil(cfg.epochs * math.ceil(len(data.fit) / cfg.batch_size))
    bundle = build_optimizer(name, model, lr=lr, total_steps=steps, **overrides)
    recipe = Recipe()
    schedule = recipe.scheduler(bundle.optimizer, steps)
    batches = shuffled_batches(len(data.fit), cfg.batch_size, 1000 * seed + _STAGE[task])
    x, y = data.tasks[task]
    model.train()
    loss = torch.zeros(())
    for _ in range(steps):
        idx = torch.tensor([data.fit[i] for i in next(batches)])
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        if not torch.isfinite(loss):
            break
        loss.backward()
        recipe.clip(model.parameters())
        bundle.step()
        schedule.step()
        bundle.optimizer.zero_grad(set_to_none=True)
    return {"final_train_loss": float(loss.detach()), "diverged": not bool(torch.isfinite(loss))}


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)  # strict JSON stores an infinite loss as null


def _best(rates: dict[float, list[float | None]]) -> float:
    """The rate with the lowest mean held-out loss (a diverged seed: +inf); ties to the smaller rate."""
    def key(lr):
        losses = rates[lr]
        return (sum(losses) / len(losses) if losses and all(_finite(v) for v in losses) else math.inf, lr)
    return min(rates, key=key)


def _search(run_at, loss_of, grid: list[float], extensions: int) -> dict[float, dict]:
    """``run_at(lr)`` over ``grid``, then one step beyond the best rate (by ``loss_of(record)``)
    while it sits on an edge, at most ``extensions`` times; the records by rate, sorted."""
    tried = {lr: run_at(lr) for lr in grid}
    for _ in range(extensions):
        nxt = rate_beyond_edge(tried, _best({lr: [loss_of(r)] for lr, r in tried.items()}))
        if nxt is None:
            break
        tried[nxt] = run_at(nxt)
    return dict(sorted(tried.items()))


class MissingRun(LookupError):
    """A run that a read-only ``Runs`` does not hold."""


class Runs:
    """One JSON file per finished run under ``root``; ``get`` computes and stores a missing one, or
    one made under other ``settings`` (those that decide a run's numbers: the protocol, the
    threads, torch's version), which it replaces. ``read_only``: raise ``MissingRun`` instead."""

    def __init__(self, root: Path, settings: dict, read_only: bool = False):
        self.root, self.settings, self.read_only = root, settings, read_only

    def get(self, *parts: str, compute, complete=None) -> dict:
        """``complete(record)``: whether a stored record holds everything this version measures; an
        incomplete one is computed again (or, read-only, returned as it is)."""
        path = self.root.joinpath(*parts[:-1], parts[-1] + ".json")  # not with_suffix: "lr0.001" has a dot
        if path.exists():
            stored = json.loads(path.read_text())
            if stored.get("settings") == self.settings and (self.read_only or complete is None
                                                            or complete(stored["record"])):
                return stored["record"]
        if self.read_only:
            raise MissingRun(str(path))
        # The machine is recorded, not compared: the CPU can change between sessions (Intel, AMD),
        # and the two round differently, so a resumed experiment says which runs came from which.
        atomic_write_json(path, {"settings": self.settings, "record": ex.jsonable(compute()),
                                 "machine": ex.machine_info()})
        return json.loads(path.read_text())["record"]


def run_settings(cfg: ContinualConfig) -> dict:
    """What decides one run's numbers; the methods, second tasks, seed count and grids only decide
    which runs there are."""
    decided = {k: v for k, v in ex.jsonable(asdict(cfg)).items()
               if k not in ("methods", "task2", "seeds", "lr_grids", "max_grid_extensions")}
    return {**decided, "torch": torch.__version__}


def run(config: ContinualConfig, out_dir: str, progress=None, render_only: bool = False) -> dict:
    """Runs (or resumes) the whole experiment; returns the JSON-ready result. ``render_only``: runs
    nothing, and reports the methods whose runs are all on file (the rest listed as unfinished)."""
    cfg = config
    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        data = Digits(cfg)
        pretrained = pretrain(data, cfg)
        runs = Runs(Path(out_dir) / "runs", run_settings(cfg), read_only=render_only)
        seeds = [cfg.first_seed + i for i in range(cfg.seeds)]
        tick = progress if callable(progress) else (lambda msg: None)
        methods, unfinished = {}, {}
        for method in cfg.methods:
            try:
                methods[method] = _method(cfg, method, data, pretrained, runs, seeds, tick)
            except MissingRun as missing:
                unfinished[method] = f"no run file {Path(str(missing)).relative_to(out_dir)}"
        comparisons = compare(methods, cfg.task2) if REFERENCE in methods else []
        return {"config": ex.jsonable(asdict(cfg)), "seeds": seeds,
                "parameters": sum(p.numel() for p in pretrained.parameters()),
                "sizes": {"fit": len(data.fit), "heldout": len(data.heldout), "test": len(data.test),
                          "pretrain": len(data.pre_y)},
                "methods": methods, "unfinished": unfinished, "comparisons": comparisons,
                "elapsed_s": time.perf_counter() - started, "machine": ex.machine_info()}
    finally:
        torch.set_num_threads(threads)


def _method(cfg: ContinualConfig, method: str, data: Digits, pretrained: nn.Module, runs: Runs, seeds: list[int],
            tick) -> dict:
    """One method's stages: the task-1 search, then each second task over the whole grid and every seed."""
    grid = sorted(cfg.lr_grids[METHODS[method][0]])
    models: dict[tuple[float, int], nn.Module] = {}

    def task1(lr: float, seed: int) -> dict:
        def compute():
            model = copy.deepcopy(pretrained)
            info = train_stage(model, data, "task1", method, lr, seed, cfg)
            models[(lr, seed)] = model  # the chosen one continues into task 2
            return {**info, "heldout": evaluate(model, data, "task1", data.heldout),
                    "test": evaluate(model, data, "task1", data.test)}
        return runs.get("task1", method, f"lr{lr:g}-seed{seed}", compute=compute)

    # task-1 rate: first seed, held-out loss, grid extended at an edge
    tuning = _search(lambda lr: task1(lr, seeds[0]), lambda r: r["heldout"]["loss"], grid,
                     cfg.max_grid_extensions)
    lr1 = _best({lr: [r["heldout"]["loss"]] for lr, r in tuning.items()})
    tick(f"{method}: task-1 rate {lr1:g}")

    def task1_model(seed: int) -> nn.Module:
        if (lr1, seed) not in models:  # retrain (deterministic) when resuming
            model = copy.deepcopy(pretrained)
            train_stage(model, data, "task1", method, lr1, seed, cfg)
            models[(lr1, seed)] = model
        return models[(lr1, seed)]

    kinds = {}
    for kind in cfg.task2:
        def task2(lr: float, seed: int, kind: str = kind) -> dict:
            def compute():
                model = copy.deepcopy(task1_model(seed))
                head1 = copy.deepcopy(model.fc)
                before = evaluate(model, data, "task1", data.test)
                refit_before = task1_refit(model, data, data.test)
                info = train_stage(model, data, kind, method, lr, seed, cfg)
                record = {**info, "task1_before": before["accuracy"],
                          "task2_heldout": evaluate(model, data, kind, data.heldout),
                          "task2_test": evaluate(model, data, kind, data.test)}
                model.fc = head1  # the task-1 head, as it was after task 1
                record["task1_after_heldout"] = evaluate(model, data, "task1", data.heldout)
                record["task1_after_test"] = evaluate(model, data, "task1", data.test)
                record["task1_refit_test"] = {"before": refit_before, "after": task1_refit(model, data, data.test)}
                return record
            # A record made before the refit measures is computed again whole, from a retrained
            # task-1 model: its old-head numbers (and so the held-out loss that tunes the rate) may
            # change with them where this CPU rounds otherwise than the one that made it.
            record = runs.get(kind, method, f"lr{lr:g}-seed{seed}", compute=compute,
                              complete=lambda r: "task1_refit_test" in r)
            tick(f"{method} {kind} lr {lr:g} seed {seed}")
            return record

        first = _search(lambda lr: task2(lr, seeds[0]), lambda r: r["task2_heldout"]["loss"], grid,
                        cfg.max_grid_extensions)
        cells = {lr: [first[lr]] + [task2(lr, s) for s in seeds[1:]] for lr in first}
        kinds[kind] = summarize_cells(cells)
    return {"lr_task1": lr1, "lr_task1_at_edge": rate_beyond_edge(tuning, lr1) is not None,
            "task1_tuning": {f"{lr:g}": r["heldout"] for lr, r in tuning.items()}, "task2": kinds}


def summarize_cells(cells: dict[float, list[dict]]) -> dict:
    """Per rate: the per-seed test scores and their means; the rate tuned by held-out loss."""
    grid = {}
    for lr, records in cells.items():
        task2 = [r["task2_test"]["accuracy"] for r in records]
        after = [r["task1_after_test"]["accuracy"] for r in records]
        before = [r["task1_before"] for r in records]
        grid[f"{lr:g}"] = {"lr": lr, "task2": task2, "task1_after": after, "task1_before": before,
                           "forgetting": [b - a for b, a in zip(before, after)],
                           "heldout_loss": [r["task2_heldout"]["loss"] if _finite(r["task2_heldout"]["loss"])
                                            else math.inf for r in records],
                           "diverged": sum(bool(r["diverged"]) for r in records),
                           "mean_task2": statistics.fmean(task2), "mean_task1_after": statistics.fmean(after)}
        if all("task1_refit_test" in r for r in records):  # run files made before the refits lack them
            probe = [r["task1_refit_test"]["after"]["probe"] for r in records]
            probe_before = [r["task1_refit_test"]["before"]["probe"] for r in records]
            grid[f"{lr:g}"].update({
                "task1_after_probe": probe, "task1_before_probe": probe_before,
                "task1_after_offset": [r["task1_refit_test"]["after"]["offset"] for r in records],
                "forgetting_probe": [b - a for b, a in zip(probe_before, probe)],
                "mean_task1_after_probe": statistics.fmean(probe)})
    tuned = _best({g["lr"]: g["heldout_loss"] for g in grid.values()})
    return {"grid": grid, "tuned_lr": tuned, "tuned_at_edge": rate_beyond_edge([g["lr"] for g in grid.values()], tuned)
            is not None}


PROBE_KEYS = ("task1_after_probe", "task1_after_offset", "forgetting_probe")


def compare(methods: dict, kinds: list[str]) -> list[dict]:
    """Each method against AdamW, per second task: paired per-seed differences at the tuned rates,
    and retention at equal task-2 score against AdamW's frontier of grid means."""
    from ..analysis.frontier import paired_dominance, retention_at_equal_score
    from ..analysis.stats import judged_difference

    rows = []
    for kind in kinds:
        ref = methods[REFERENCE]["task2"][kind]
        ref_cell = ref["grid"][f"{ref['tuned_lr']:g}"]
        for method, m in methods.items():
            if method == REFERENCE:
                continue
            k = m["task2"][kind]
            cell = k["grid"][f"{k['tuned_lr']:g}"]
            row = {"kind": kind, "method": method}
            for metric in ("task2", "task1_after", "forgetting", *PROBE_KEYS):
                if metric in cell and metric in ref_cell:
                    row[metric] = judged_difference([a - b for a, b in zip(cell[metric], ref_cell[metric])])
            # Task 1 after, with its old head (the paper's measure) and, where measured, with a probe refit.
            for after, suffix in (("task1_after", ""), ("task1_after_probe", "_probe")):
                if not all(after in g for grid in (k["grid"], ref["grid"]) for g in grid.values()):
                    continue
                reference = {"grid": [{"validation": g["mean_task2"], "retention": g[f"mean_{after}"]}
                                      for g in ref["grid"].values()]}
                equal = retention_at_equal_score({"scores": cell["task2"], "retention": cell[after]}, reference)
                equal.pop("front")
                row[f"retention_at_equal_task2{suffix}"] = equal
                # Every rate ran every seed, so each of the method's frontier points can be set against
                # each of AdamW's, paired by seed, on both axes at once.
                adamw_points = {lr: {"score": g["task2"], "retention": g[after]} for lr, g in ref["grid"].items()}
                row[f"frontier_dominance{suffix}"] = {}
                for lr, g in k["grid"].items():
                    found = paired_dominance({"score": g["task2"], "retention": g[after]}, adamw_points)
                    found.pop("pairs")
                    row[f"frontier_dominance{suffix}"][lr] = found
            rows.append(row)
    return rows


# -- rendering ---------------------------------------------------------------------------------

def render(result: dict, out_dir: str) -> list[Path]:
    cfg = result["config"]
    sections = [f"{result['parameters'] / 1e6:.2f} M-parameter CNN, {len(result['seeds'])} seeds, {cfg['epochs']:g} "
                f"epochs a task; accuracy x 100 on the test images (task 1: {result['sizes']['test']} images); "
                f"rates chosen on {result['sizes']['heldout']} held-out training images, never on the test images.",
                ""]
    if result.get("unfinished"):
        sections += ["Still running, left out of every table: " + "; ".join(
            f"{method} ({why})" for method, why in result["unfinished"].items()) + ".", ""]
    written = []
    for kind in cfg["task2"]:
        rows = []
        for method, m in result["methods"].items():
            k = m["task2"][kind]
            c = k["grid"][f"{k['tuned_lr']:g}"]
            rows.append([method, f"{m['lr_task1']:g}" + (" (edge)" if m.get("lr_task1_at_edge") else ""),
                         f"{k['tuned_lr']:g}" + (" (edge)" if k["tuned_at_edge"] else ""),
                         *(percent_mean_std(c[key], 1)
                           for key in ("task1_before", "task2", "task1_after", "forgetting"))])
        comp = [[r["method"], *(x for key in ("task2", "task1_after", "retention_at_equal_task2")
                                for x in (percent_interval(r[key], 1, with_verdict=False), r[key]["verdict"])),
                 f"{r['retention_at_equal_task2']['seeds_above_front']} / "
                 f"{r['retention_at_equal_task2']['seeds_below_front']}"]
                for r in result["comparisons"] if r["kind"] == kind]
        grid_rows = [[method, ", ".join(f"{lr}: {percent(g['mean_task2'], 1)} / {percent(g['mean_task1_after'], 1)}"
                                        + (f" ({g['diverged']} diverged)" if g["diverged"] else "")
                                        for lr, g in m["task2"][kind]["grid"].items())]
                     for method, m in result["methods"].items()]
        name = f"continual_{kind}.png"
        written.append(plot_frontiers(result, kind, Path(out_dir) / name))
        probed = [r for r in result["comparisons"] if r["kind"] == kind and "task1_after_probe" in r]
        sections += [f"## Task 2: {kind} (rotated {TASK2[kind]:g} degrees)", "",
                     ex.markdown_table(["method", "task-1 rate", "task-2 rate (held-out loss)", "task 1", "task 2",
                                        "task 1 after", "forgetting"], rows), "",
                     "Against AdamW at the tuned rates, paired by seed: difference [95 % interval] and the verdict "
                     "it supports. Retention at equal task-2 score: the method's per-seed task-1 accuracy after task "
                     "2 minus AdamW's frontier (its grid means) at the same task-2 accuracy; seeds outside the "
                     "frontier's range are counted (above / below) and left out.", "",
                     ex.markdown_table(["method", "task 2", "", "task 1 after", "", "retention at equal task 2", "",
                                        "outside AdamW's range"], comp), "",
                     "Frontier points (mean task 2 / mean task 1 after, per rate):", "",
                     ex.markdown_table(["method", "rate: task 2 / task 1 after"], grid_rows), "",
                     "Each frontier point against each of AdamW's, paired by seed on both axes (95 % intervals, "
                     "Bonferroni-widened over AdamW's points): the AdamW rates that beat it on both task 2 and task "
                     "1 after, and those it beats on both.", "",
                     ex.markdown_table(["method", "rate", "beaten on both axes by AdamW at", "beats AdamW at"],
                                       _dominance_rows(result, kind)), "",
                     f"![{kind}]({name})", ""]
        if probed:
            probe_name = f"continual_{kind}_probe.png"
            written.append(plot_frontiers(result, kind, Path(out_dir) / probe_name, "mean_task1_after_probe"))
            means = [[method, *(percent_mean_std(c[key], 1) for key in ("task1_before_probe", "task1_after_probe",
                                                                          "task1_after_offset"))]
                     for method, m in result["methods"].items()
                     if "task1_after_probe" in (c := m["task2"][kind]["grid"][f"{m['task2'][kind]['tuned_lr']:g}"])]
            # At equal task 2 needs the probe on every grid cell of both methods, which a folder
            # rendered part way through its recomputation lacks: "not measured" there.
            comp_probe = [[r["method"], *(x for key in ("task1_after_probe", "forgetting_probe", "task1_after_offset",
                                                        "retention_at_equal_task2_probe")
                                          for x in ((percent_interval(r[key], 1, with_verdict=False),
                                                     r[key]["verdict"]) if key in r else ("not measured", ""))),
                           (f"{r['retention_at_equal_task2_probe']['seeds_above_front']} / "
                            f"{r['retention_at_equal_task2_probe']['seeds_below_front']}"
                            if "retention_at_equal_task2_probe" in r else "")] for r in probed]
            sections += [f"### Task 1 read by a refit probe ({kind})", "",
                         "The same runs, task 1 scored on the test images by a linear probe refit on the body's "
                         "features (the input of `fc`) and by the old head with its offset refit, both fit on the "
                         "task-1 training images (`refit.py`). The old head can fail because the features moved "
                         "while the body still holds task 1; the probe reads what the body holds.", "",
                         ex.markdown_table(["method", "probe before", "probe after", "offset refit after"], means), "",
                         ex.markdown_table(["method", "probe after", "", "probe forgetting", "",
                                            "offset refit after", "",
                                            "probe at equal task 2", "", "outside AdamW's range"], comp_probe), "",
                         ex.markdown_table(["method", "rate", "probe: beaten on both axes by AdamW at",
                                            "probe: beats AdamW at"], _dominance_rows(result, kind, "_probe")), "",
                         f"![{kind} probe]({probe_name})", ""]
    sections += ["## Settings", "", ex.settings_table(cfg)]
    title = "Vision continual finetuning: frontiers of new-task accuracy against old-task retention"
    return [*written, ex.write_markdown(out_dir, "continual", title, result, sections)]


def _dominance_rows(result: dict, kind: str, suffix: str = "") -> list[list[str]]:
    rows = []
    for r in result["comparisons"]:
        if r["kind"] != kind or f"frontier_dominance{suffix}" not in r:
            continue
        for lr, d in r[f"frontier_dominance{suffix}"].items():
            rows.append([r["method"], lr, ", ".join(d["dominated_by"]) or "-", ", ".join(d["dominates"]) or "-"])
    return rows


def plot_frontiers(result: dict, kind: str, path: Path, after: str = "mean_task1_after") -> Path:
    """Task-1 accuracy after task 2 (``after``: with the old head, or ``mean_task1_after_probe``)
    against task-2 accuracy, one line per method over its rates (grid means), a panel per density
    (AdamW in each)."""
    plt = ex.pyplot()
    methods = list(result["methods"])
    groups = sorted({m.rsplit("-", 1)[1] for m in methods if m.endswith("%")}) or [""]
    fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 4.4), squeeze=False)
    for ax, density in zip(axes[0], groups):
        for method in methods:
            if method.endswith("%") and not method.endswith("-" + density):  # AdamW and the control: every panel
                continue
            grid = {lr: g for lr, g in result["methods"][method]["task2"][kind]["grid"].items() if after in g}
            xs = [100 * g["mean_task2"] for g in grid.values()]
            ys = [100 * g[after] for g in grid.values()]
            (line,) = ax.plot(xs, ys, marker="o", label=method)
            for lr, x, y in zip(grid, xs, ys):
                ax.annotate(lr, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7, color=line.get_color())
        ax.set_xlabel(f"task 2 ({kind}) test accuracy, %")
        probe = " (probe refit)" if after != "mean_task1_after" else ""
        ax.set_ylabel(f"task 1 test accuracy after task 2, %{probe}")
        ax.set_title(f"density {density}" if density else kind, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Task 2 {kind}: one point per learning rate\n(mean of {len(result['seeds'])} seeds)", fontsize=10)
    fig.tight_layout()
    return ex.save_figure(fig, str(path), dpi=120)


def main(config: ContinualConfig, out_dir: str, command: str, progress=None, render_only: bool = False) -> list[Path]:
    def run_with_command(cfg):
        return {"command": command, **run(cfg, out_dir, progress, render_only)}

    return ex.run_and_render(run_with_command, render, config, out_dir, "continual")
