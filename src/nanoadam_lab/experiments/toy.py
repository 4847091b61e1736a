"""Toy teacher-student experiment of Sec. 2.3 / Appendix E (Fig. 3, Tables 8 and 9).

Small weights versus large gradients when finetuning a two-layer ReLU network
``f(x) = sum_j a_j relu(w_j . x)`` that was pretrained in the feature-learning (rich) regime.

Setup. The extracted paper lost every number of Appendix E; each one below is a choice made here
(defaults of ``ToyConfig``), also listed in the rendered ``toy.md``:

* Inputs ``x ~ N(0, I_d)`` with ``d = input_dim = 2``, so that neurons can be drawn exactly (Fig. 3).
* Teacher: ``teacher_width = 2`` neurons, ``w*_i`` with i.i.d. Rademacher entries divided by ``sqrt(d)``
  (unit norm) and ``a*_i`` Rademacher (+-1). Teacher and added neurons get pairwise distinct sign patterns
  (drawn without replacement), so that an added neuron is a new feature: in ``d = 2`` there are only four
  patterns, the diagonals, and a duplicate would only rescale an old neuron.
* Student: ``student_width = 50`` neurons, balanced small initialization ``w_j ~ N(0, init_scale^2 / d I)``,
  ``a_j = s_j ||w_j||`` with a Rademacher sign ``s_j`` (``init_scale = 1e-3``). No ``1/m`` factor: with
  tiny balanced weights this is the rich regime, where neurons first align with teacher directions and
  then grow, while the others stay small (implicit sparsity).
* Pretraining: full-batch gradient descent on ``0.5 * mean((f(x) - y)^2)`` over ``n_train = 1000`` fixed
  samples, ``pretrain_steps = 4000`` steps at ``pretrain_lr = 0.1`` (train MSE below 2e-5 on every default seed).
* Finetuning tasks: the teacher plus ``k`` new neurons drawn like the teacher ones (``k = 1``: Table 8,
  ``k = 2``: Table 9; the 2-neuron task contains the neuron of the 1-neuron task), on a fresh training
  set of ``n_train`` samples.
* Finetuning, two update rules (``updates``): ``gd``, masked full-batch gradient descent (the
  paper's "nano gradient flow"), and ``adam``, NanoAdam itself (``nanoadam.NanoAdam``: Adam moments
  for the selected entries, newly selected entries starting fresh, float32 moments), both for
  ``finetune_steps = 5000`` full-batch steps. In each layer (``W`` and ``a`` separately) only
  ``ceil(fraction * numel)`` entries move (``fraction = 0.1``: 10 of the 100 entries of ``W``, 5 of
  the 50 of ``a``), chosen as the smallest ``|weight|`` (``small_weights``, NanoAdam's rule) or the
  largest ``|gradient|`` (``large_gradients``). Main result: both masks are re-chosen every
  ``mask_interval = 10`` steps (NanoAdam's refresh, at its steps 1, 11, 21, ...), from the current
  weights resp. the current full gradient. The ``*_static`` variants choose the mask once, at the
  first finetuning step, and keep it (the setting of Theorem 2.2, where one fixed small neuron is
  trained). A reference run updating every weight (``full``) is reported too.
* Learning rates: each (task, update rule, strategy) gets the rate of its grid (``lr_grids``) with
  the lowest mean log10 MSE over seeds on ``n_val = 2000`` fresh validation samples of the new
  task; a best rate on an edge of the grid extends it (up to ``max_grid_extensions`` times).
* Metrics on ``n_test = 10000`` fresh samples: test MSE ``mean((f(x) - y)^2)`` (no 1/2) on the new task;
  distance travelled ``||theta_ft - theta_pre||_2`` over all parameters (the weight-space measure of
  Lemma E.2); also the path length (sum of step norms), the distance restricted to the large pretrained
  neurons (``|a_j| ||w_j|| >= large_neuron_threshold * max``, threshold 0.1: how much of the pretrained
  representation is overwritten, Definition 2.1), the fraction of entries ever moved and the masked share
  of the squared gradient norm (with Adam steps: of the entries that moved). Mean and sample
  standard deviation (``ddof = 1``) over ``n_seeds = 10`` seeds ``seed, seed + 1, ...``; each seed
  draws its own teacher, added neurons, data and initialization. Small weights are compared with
  large gradients by paired per-seed differences (log10 test MSE, distance, large-neuron
  distance) with 95 % t-intervals; a verdict is printed only where the interval excludes zero.

Figures: one per task and update rule, a panel per strategy (re-chosen masks and the reference on top, static masks
below). Teacher neurons are arrows to ``|a*_i| w*_i`` (solid: pretraining teacher, dashed: added
neurons); student neurons are points at ``|a_j| w_j`` (hollow: pretrained, filled: finetuned, a grey
segment joins the two); colour is the sign of the output weight (red ``+``, blue ``-``). For ``d > 2``
the drawing is projected on the plane of the first two teacher neurons.

Everything is float64 on one CPU thread with explicit (loop-free) gradients, deterministic given the
seed. Reproduce the committed results (``docs/results/toy``) with ``nanoadam reproduce toy``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import experiment as ex
from .._io import atomic_write_json
from .recipe import rate_beyond_edge

STRATEGIES = ("small_weights", "large_gradients", "small_weights_static", "large_gradients_static", "full")
LABELS = {
    "small_weights": "Small weights",
    "large_gradients": "Large gradients",
    "small_weights_static": "Small weights, static mask",
    "large_gradients_static": "Large gradients, static mask",
    "full": "All weights (reference)",
}
# pairs compared in the verdict: the re-selected masks (the main result) and the masks chosen once at step 0
PAIRS = {"dynamic": ("small_weights", "large_gradients"), "static": ("small_weights_static", "large_gradients_static")}
DTYPE = torch.float64
# "gd": masked full-batch gradient descent (the paper's nano gradient flow); "adam": NanoAdam itself
# (nanoadam.NanoAdam, Adam moments for the selected entries, the same mask rules through its
# ``selection`` and ``mask_interval``).
UPDATES = ("gd", "adam")
UPDATE_LABELS = {"gd": "gradient descent", "adam": "NanoAdam (Adam steps)"}
LR_GRIDS = {"gd": (0.02, 0.05, 0.1), "adam": (3e-3, 1e-2, 3e-2)}


@dataclass
class ToyConfig:
    """Every knob of the toy experiment; the defaults produce ``docs/results/toy``."""

    seed: int = 0  # first seed; seeds are seed, seed + 1, ..., seed + n_seeds - 1
    n_seeds: int = 10
    input_dim: int = 2  # d
    teacher_width: int = 2  # neurons of the pretraining teacher
    student_width: int = 50  # m
    added_neurons: tuple[int, ...] = (1, 2)  # finetuning tasks: teacher + k new neurons (Table 8: 1, Table 9: 2)
    n_train: int = 1000  # fixed full-batch training set (one for pretraining, a fresh one for finetuning)
    n_test: int = 10000  # fresh test samples
    init_scale: float = 1e-3  # E||w_j|| at init, with |a_j| = ||w_j|| (balanced)
    n_val: int = 2000  # fresh samples of the finetuning task that choose the learning rate (never the test set)
    pretrain_steps: int = 4000
    pretrain_lr: float = 0.1
    finetune_steps: int = 5000
    updates: tuple[str, ...] = UPDATES
    # learning-rate grids per update rule; a best rate on an edge extends the grid by the same factor
    lr_grids: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(LR_GRIDS))
    max_grid_extensions: int = 3
    fraction: float = 0.1  # fraction of the entries of each layer (W and a separately) that is finetuned
    mask_interval: int = 10  # steps between mask re-selections (same rule for both strategies)
    strategies: tuple[str, ...] = STRATEGIES
    large_neuron_threshold: float = 0.1  # "large" pretrained neuron: |a_j| ||w_j|| >= this * max
    figure_seed: int = 0  # index (into the seeds) of the run drawn in the figures
    out_dir: str = "docs/results/toy"


# ----------------------------------------------------------------------------------------------------------------
# model, data, gradients


def forward(W: torch.Tensor, a: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``f(x) = sum_j a_j relu(w_j . x)`` for every row of ``X`` (``W``: m x d, ``a``: m)."""
    return (X @ W.T).clamp_min(0) @ a


def loss_and_grads(W: torch.Tensor, a: torch.Tensor, X: torch.Tensor, y: torch.Tensor):
    """Objective ``0.5 * mean((f - y)^2)`` and its gradients in ``W`` and ``a`` (ReLU'(0) = 0, as autograd)."""
    h = X @ W.T  # n x m
    act = h.clamp_min(0)
    e = act @ a - y  # n
    n = X.shape[0]
    ga = act.T @ e / n
    gW = (X.T @ torch.where(h > 0, e[:, None] * a[None, :], 0.0)).T / n
    return 0.5 * (e @ e) / n, gW, ga


def mse(W: torch.Tensor, a: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> float:
    return float(((forward(W, a, X) - y) ** 2).mean())


def rademacher_rows(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` pairwise distinct rows of +-1 entries (without replacement while 2^d allows it)."""
    if d <= 20 and n <= 2**d:
        codes = torch.randperm(2**d, generator=gen)[:n]
        bits = (codes[:, None] >> torch.arange(d)[None, :]) & 1
        return (2 * bits - 1).to(DTYPE)
    return (2 * torch.randint(0, 2, (n, d), generator=gen) - 1).to(DTYPE)


@dataclass
class Problem:
    """One seed: teacher, added neurons, data and the student initialization."""

    Wt: torch.Tensor  # (teacher_width + max k) x d: teacher rows first, then the added neurons
    at: torch.Tensor
    X_pre: torch.Tensor
    X_ft: torch.Tensor
    X_test: torch.Tensor
    W0: torch.Tensor
    a0: torch.Tensor
    X_val: torch.Tensor


def make_problem(cfg: ToyConfig, seed: int) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    d, n_new = cfg.input_dim, max(cfg.added_neurons, default=0)
    Wt = rademacher_rows(cfg.teacher_width + n_new, d, gen) / math.sqrt(d)
    at = (2 * torch.randint(0, 2, (cfg.teacher_width + n_new,), generator=gen) - 1).to(DTYPE)
    X_pre = torch.randn(cfg.n_train, d, generator=gen, dtype=DTYPE)
    X_ft = torch.randn(cfg.n_train, d, generator=gen, dtype=DTYPE)
    X_test = torch.randn(cfg.n_test, d, generator=gen, dtype=DTYPE)
    W0 = torch.randn(cfg.student_width, d, generator=gen, dtype=DTYPE) * (cfg.init_scale / math.sqrt(d))
    signs = (2 * torch.randint(0, 2, (cfg.student_width,), generator=gen) - 1).to(DTYPE)
    a0 = signs * W0.norm(dim=1)
    X_val = torch.randn(cfg.n_val, d, generator=gen, dtype=DTYPE)
    return Problem(Wt, at, X_pre, X_ft, X_test, W0, a0, X_val)


# ----------------------------------------------------------------------------------------------------------------
# training


def pretrain(W: torch.Tensor, a: torch.Tensor, X: torch.Tensor, y: torch.Tensor, steps: int, lr: float):
    """Full-batch gradient descent on all parameters; returns the final weights and the loss curve (every 1 %)."""
    W, a = W.clone(), a.clone()
    every = max(1, steps // 100)
    curve = []
    for t in range(steps):
        loss, gW, ga = loss_and_grads(W, a, X, y)
        if t % every == 0:
            curve.append([t, float(loss)])
        W -= lr * gW
        a -= lr * ga
    curve.append([steps, float(loss_and_grads(W, a, X, y)[0])])
    return W, a, curve


def select_mask(weight: torch.Tensor, grad: torch.Tensor, strategy: str, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` entries of one layer that the strategy updates."""
    if strategy == "full":
        return torch.ones_like(weight, dtype=torch.bool)
    strategy = strategy.removesuffix("_static")
    if strategy == "small_weights":
        idx = torch.topk(weight.abs().flatten(), k, largest=False).indices
    elif strategy == "large_gradients":
        idx = torch.topk(grad.abs().flatten(), k, largest=True).indices
    else:
        raise ValueError(f"unknown strategy {strategy!r} (expected one of {STRATEGIES})")
    mask = torch.zeros(weight.numel(), dtype=torch.bool)
    mask[idx] = True
    return mask.view_as(weight)


def kept(fraction: float, numel: int) -> int:
    """Entries finetuned in a layer of ``numel`` entries: ``ceil(fraction * numel)``, at least 1."""
    return max(1, min(numel, math.ceil(round(fraction * numel, 9))))


def _gd_update(W: torch.Tensor, a: torch.Tensor, strategy: str, lr: float, fraction: float, mask_interval: int):
    """Masked gradient descent: ``update(t, W, a, gW, ga) -> (W_new, a_new, mask_W, mask_a)``."""
    kW, ka = kept(fraction, W.numel()), kept(fraction, a.numel())
    if strategy == "full":
        kW, ka = W.numel(), a.numel()
    static = strategy.endswith("_static")
    masks = []

    def update(t, W, a, gW, ga):
        if t == 0 or (not static and t % mask_interval == 0):
            masks[:] = [select_mask(W, gW, strategy, kW), select_mask(a, ga, strategy, ka)]
        mW, ma = masks
        return W - lr * gW * mW, a - lr * ga * ma, mW, ma

    return update, {"W": kW, "a": ka}


def _nanoadam_update(W: torch.Tensor, a: torch.Tensor, strategy: str, lr: float, fraction: float,
                     mask_interval: int):
    """NanoAdam's own step on ``(W, a)``: its ``selection`` is the strategy (``small_weights`` or
    ``large_gradients``), refreshed every ``mask_interval`` steps (never for ``*_static``); ``full``
    is density 1 (AdamW step for step). One chunk per layer, so the kept count is ``kept``'s;
    float32 moments (the weights are float64), no weight decay. The masks handed back are the
    entries that moved."""
    from torch import nn

    from nanoadam import NanoAdam

    params = [nn.Parameter(W.clone()), nn.Parameter(a.clone())]
    full = strategy == "full"
    opt = NanoAdam(params, lr=lr, weight_decay=0.0, density=1.0 if full else fraction,
                   mask_interval=None if full or strategy.endswith("_static") else mask_interval,
                   selection="small_weights" if full else strategy.removesuffix("_static"),
                   chunk_size=max(4096, W.numel(), a.numel()), state_dtype=torch.float32, stochastic_rounding=False)

    def update(t, W, a, gW, ga):
        params[0].grad, params[1].grad = gW.clone(), ga.clone()
        opt.step()
        W_new, a_new = params[0].detach().clone(), params[1].detach().clone()
        return W_new, a_new, W_new != W, a_new != a

    k = {"W": W.numel(), "a": a.numel()} if full else {"W": kept(fraction, W.numel()), "a": kept(fraction, a.numel())}
    return update, k


def finetune(W: torch.Tensor, a: torch.Tensor, X: torch.Tensor, y: torch.Tensor, strategy: str, steps: int,
             lr: float, fraction: float, mask_interval: int, callback: Callable | None = None,
             update: str = "gd") -> dict:
    """Masked full-batch finetuning from ``(W, a)`` with ``update`` (one of ``UPDATES``).

    ``gd``: every ``mask_interval`` steps (from step 0) the masks of ``W`` and ``a`` are re-chosen
    with ``select_mask`` (only at step 0 for the ``*_static`` strategies); each step moves only the
    masked entries by ``-lr * gradient``. ``adam``: NanoAdam steps with the same rules.
    ``callback(t, (W, a) before, (W, a) after, (mask_W, mask_a))`` is called after every step when
    given. Returns the final weights and per-run statistics, among them ``gradient_share``: the
    masked part of the squared full-gradient norm, averaged over the steps (1 for ``full``; near 0
    when the mask sits on entries that the new task does not move).
    """
    if update not in UPDATES:
        raise ValueError(f"unknown update {update!r} (expected one of {UPDATES})")
    make = _gd_update if update == "gd" else _nanoadam_update
    step, k = make(W, a, strategy, lr, fraction, mask_interval)
    W, a = W.clone(), a.clone()
    zero = torch.zeros((), dtype=torch.long)
    path = torch.zeros((), dtype=DTYPE)
    share = torch.zeros((), dtype=DTYPE)  # sum over steps of the masked share of the squared gradient norm
    max_W, max_a = zero, zero
    ever_W, ever_a = torch.zeros_like(W, dtype=torch.bool), torch.zeros_like(a, dtype=torch.bool)
    for t in range(steps):
        _, gW, ga = loss_and_grads(W, a, X, y)
        W_new, a_new, mW, ma = step(t, W, a, gW, ga)
        full_sq = gW.square().sum() + ga.square().sum()
        share += ((gW * mW).square().sum() + (ga * ma).square().sum()) / full_sq.clamp_min(1e-300)
        changed_W, changed_a = W_new != W, a_new != a  # what actually moved, rounding included
        max_W, max_a = torch.maximum(max_W, changed_W.sum()), torch.maximum(max_a, changed_a.sum())
        ever_W |= changed_W
        ever_a |= changed_a
        path += ((W_new - W).square().sum() + (a_new - a).square().sum()).sqrt()
        if callback is not None:
            callback(t, (W, a), (W_new, a_new), (mW, ma))
        W, a = W_new, a_new
    max_changed = {"W": int(max_W), "a": int(max_a)}
    ever = {"W": ever_W, "a": ever_a}
    return {
        "W": W, "a": a, "path_length": float(path), "gradient_share": float(share) / max(1, steps),
        "kept": k, "max_changed_per_step": max_changed,
        "ever_changed_fraction": {key: float(v.double().mean()) for key, v in ever.items()},
    }


def _stats(xs: list[float]) -> dict:
    t = torch.tensor(xs, dtype=DTYPE)
    std = float(t.std(unbiased=True)) if len(xs) > 1 else 0.0
    return {"mean": float(t.mean()), "std": std, "values": [float(x) for x in xs]}


def _neurons(W: torch.Tensor, a: torch.Tensor) -> dict:
    return {"W": W.tolist(), "a": a.tolist()}


# ----------------------------------------------------------------------------------------------------------------
# experiment


def run(config: ToyConfig, progress=None, cells_dir: str | None = None) -> dict:
    """Run the whole experiment; returns a JSON-serializable dict (see ``render``).

    ``cells_dir``: where each finished (task, update, strategy, rate) is kept, so that a stopped
    run resumes (``main`` uses ``out_dir/cells``); None keeps nothing.

    ``progress``: ``None`` (silent), ``True`` (a tqdm bar) or a callable receiving one message per unit of work.
    """
    cfg = config
    if cfg.n_seeds < 1 or not cfg.added_neurons:
        raise ValueError("need at least one seed and one finetuning task")
    for s in cfg.strategies:
        if s not in STRATEGIES:
            raise ValueError(f"unknown strategy {s!r} (expected one of {STRATEGIES})")
    for u in cfg.updates:
        if u not in UPDATES:
            raise ValueError(f"unknown update {u!r} (expected one of {UPDATES})")
        grid = cfg.lr_grids.get(u)
        if not grid or any(not lr > 0 for lr in grid):
            raise ValueError(f"lr_grids[{u!r}] must be a non-empty list of rates > 0")
    total = cfg.n_seeds + len(cfg.added_neurons) * sum(len(cfg.lr_grids[u]) for u in cfg.updates) * len(cfg.strategies)
    bar = None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="toy")

    def tick(msg: str) -> None:
        if bar is not None:
            bar.set_postfix_str(msg)
            bar.update(1)
        elif callable(progress):
            progress(msg)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, and results do not depend on the core count
    try:
        return _run(cfg, tick, bar, cells_dir)
    finally:
        torch.set_num_threads(threads)


METRICS = ("test_loss", "val_loss", "distance", "path_length", "large_neuron_distance", "ever_changed_fraction_W",
           "ever_changed_fraction_a", "gradient_share")


def _log10(x: float) -> float:
    return math.log10(x) if math.isfinite(x) and x > 0 else math.inf


def choose_rate(rates: dict[float, list[dict]]) -> float:
    """The rate with the lowest mean log10 validation MSE over seeds (a diverged seed counts as +inf)."""
    return min(rates, key=lambda lr: (sum(_log10(r["val_loss"]) for r in rates[lr]) / len(rates[lr]), lr))


def _run(cfg: ToyConfig, tick: Callable, bar, cells_dir: str | None) -> dict:
    start = time.perf_counter()
    seeds = [cfg.seed + i for i in range(cfg.n_seeds)]
    T = cfg.teacher_width
    pre_train, pre_test, large_counts, pretrained = [], [], [], []
    figure = None
    for i, seed in enumerate(seeds):
        p = make_problem(cfg, seed)
        y_pre = forward(p.Wt[:T], p.at[:T], p.X_pre)
        W, a, curve = pretrain(p.W0, p.a0, p.X_pre, y_pre, cfg.pretrain_steps, cfg.pretrain_lr)
        pre_train.append(mse(W, a, p.X_pre, y_pre))
        pre_test.append(mse(W, a, p.X_test, forward(p.Wt[:T], p.at[:T], p.X_test)))
        mag = a.abs() * W.norm(dim=1)
        large = mag >= cfg.large_neuron_threshold * mag.max()
        large_counts.append(int(large.sum()))
        pretrained.append((p, W, a, large))
        tick(f"seed {seed} pretrained (test mse {pre_test[-1]:.2e})")
        if i == cfg.figure_seed:
            figure = {"seed": seed, "teacher": _neurons(p.Wt, p.at), "teacher_width": T,
                      "initial": _neurons(p.W0, p.a0), "pretrained": _neurons(W, a), "pretrain_curve": curve,
                      "finetuned": {}}

    def one_run(i: int, k: int, update: str, strategy: str, lr: float) -> dict:
        p, W, a, large = pretrained[i]
        Wt, at = p.Wt[: T + k], p.at[: T + k]
        out = finetune(W, a, p.X_ft, forward(Wt, at, p.X_ft), strategy, cfg.finetune_steps, lr, cfg.fraction,
                       cfg.mask_interval, update=update)
        dW, da = out["W"] - W, out["a"] - a
        return {"test_loss": mse(out["W"], out["a"], p.X_test, forward(Wt, at, p.X_test)),
                "val_loss": mse(out["W"], out["a"], p.X_val, forward(Wt, at, p.X_val)),
                "distance": math.sqrt(float(dW.pow(2).sum() + da.pow(2).sum())),
                "path_length": out["path_length"], "gradient_share": out["gradient_share"],
                "large_neuron_distance": math.sqrt(float(dW[large].pow(2).sum() + da[large].pow(2).sum())),
                "ever_changed_fraction_W": out["ever_changed_fraction"]["W"],
                "ever_changed_fraction_a": out["ever_changed_fraction"]["a"],
                "kept": out["kept"], "max_changed_per_step": out["max_changed_per_step"],
                "final": _neurons(out["W"], out["a"]) if i == cfg.figure_seed else None}

    # Each (task, update, strategy, rate) over all seeds is one cell file under ``out_dir/cells``, so
    # that a stopped run resumes; a file made with other settings is not reused.
    key_settings = {k: v for k, v in ex.jsonable(asdict(cfg)).items() if k != "out_dir"}

    def cell(k: int, update: str, strategy: str, lr: float) -> list[dict]:
        if cells_dir is None:
            return [one_run(i, k, update, strategy, lr) for i in range(len(seeds))]
        path = Path(cells_dir) / str(k) / update / strategy / f"lr{lr:g}.json"
        stored = json.loads(path.read_text()) if path.exists() else None
        if stored is None or stored["settings"] != key_settings:
            runs = [one_run(i, k, update, strategy, lr) for i in range(len(seeds))]
            atomic_write_json(path, {"settings": key_settings, "runs": ex.jsonable(runs)})
            stored = json.loads(path.read_text())
        # strict JSON stores a diverged (infinite) loss as null
        return [{m: (math.inf if m in METRICS and v is None else v) for m, v in r.items()} for r in stored["runs"]]

    tasks = {}
    checks = {"max_changed_per_step": {}, "kept": {}}
    for k in cfg.added_neurons:
        before = [mse(W, a, p.X_test, forward(p.Wt[: T + k], p.at[: T + k], p.X_test)) for p, W, a, _ in pretrained]
        task = {"pretrained_test_loss": _stats(before), "updates": {}}
        for update in cfg.updates:
            methods = {}
            for strategy in cfg.strategies:
                rates: dict[float, list[dict]] = {}
                grid = list(cfg.lr_grids[update])
                for lr in grid:
                    rates[lr] = cell(k, update, strategy, lr)
                    tick(f"k={k} {update} {strategy} lr {lr:g}")
                extensions = 0
                while (nxt := rate_beyond_edge(list(rates), choose_rate(rates))) is not None \
                        and extensions < cfg.max_grid_extensions:
                    rates[nxt] = cell(k, update, strategy, nxt)
                    extensions += 1
                    tick(f"k={k} {update} {strategy} lr {nxt:g} (grid extended)")
                lr = choose_rate(rates)
                runs = rates[lr]
                methods[strategy] = {
                    "lr": lr, "at_grid_edge": rate_beyond_edge(list(rates), lr) is not None,
                    "rates": {f"{r:g}": {"val_log10_mse": sum(_log10(x["val_loss"]) for x in rates[r]) / len(seeds),
                                         "test_log10_mse": sum(_log10(x["test_loss"]) for x in rates[r]) / len(seeds)}
                              for r in sorted(rates)},
                    **{m: _stats([r[m] for r in runs]) for m in METRICS}}
                for r in runs:
                    mc = checks["max_changed_per_step"].setdefault(f"{update}/{strategy}", {"W": 0, "a": 0})
                    for key in ("W", "a"):
                        mc[key] = max(mc[key], r["max_changed_per_step"][key])
                    checks["kept"][f"{update}/{strategy}"] = r["kept"]
                if figure is not None:
                    figure["finetuned"].setdefault(str(k), {}).setdefault(update, {})[strategy] = \
                        runs[cfg.figure_seed]["final"]
            task["updates"][update] = {"methods": methods}
        tasks[str(k)] = task
    if bar is not None:
        bar.close()

    cfg_dict = asdict(cfg)
    for key in ("added_neurons", "strategies", "updates"):
        cfg_dict[key] = list(getattr(cfg, key))
    cfg_dict["lr_grids"] = {u: list(g) for u, g in cfg.lr_grids.items()}
    return {
        "config": cfg_dict,
        "seeds": seeds,
        "pretrain": {"train_loss": _stats(pre_train), "test_loss": _stats(pre_test),
                     "large_neurons": _stats([float(c) for c in large_counts])},
        "tasks": tasks,
        "checks": checks,
        "comparisons": comparisons(tasks, cfg),
        "figure": figure,
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": "float64"},
        "elapsed_s": time.perf_counter() - start,
    }


# the metrics compared between the masks: test MSE on a log scale (it spans orders of magnitude
# across seeds), distances as they are
COMPARED = {"log10_test_mse": ("test_loss", _log10), "distance": ("distance", float),
            "large_neuron_distance": ("large_neuron_distance", float)}


def comparisons(tasks: dict, cfg: ToyConfig) -> list[dict]:
    """Small weights minus large gradients, per seed at each one's chosen rate, for every update
    rule, mask regime and task: the mean difference with its 95 % t-interval and the verdict it
    supports (``lower``: small weights lower on the whole interval)."""
    from ..analysis.stats import judged_difference

    rows = []
    for k, task in tasks.items():
        for update, u in task["updates"].items():
            for regime, (small, large) in PAIRS.items():
                if not {small, large} <= set(u["methods"]):
                    continue
                for name, (metric, transform) in COMPARED.items():
                    a = u["methods"][small][metric]["values"]
                    b = u["methods"][large][metric]["values"]
                    diffs = [transform(x) - transform(y) for x, y in zip(a, b)]
                    diffs = [d for d in diffs if math.isfinite(d)]
                    rows.append({"added": k, "update": update, "regime": regime, "metric": name,
                                 **judged_difference(diffs)})
    return rows


# ----------------------------------------------------------------------------------------------------------------
# outputs


def _cell(stats: dict) -> str:
    if stats["mean"] is None or stats["std"] is None:
        return "diverged on some seed"
    return ex.mean_std(stats)


def _interval(row: dict) -> str:
    if row["lo"] is None or row["hi"] is None:
        return f"{row['mean']:.3g} (n = {row['n']})" if row["mean"] is not None else "-"
    return f"{row['mean']:+.3g} [{row['lo']:+.3g}, {row['hi']:+.3g}]"


def render(result: dict, out_dir: str) -> list[Path]:
    """``toy.md`` (tables of the result's numbers and its settings) and one ``toy_<k>_added_<update>.png``
    per task and update rule, from ``result`` as read back from ``toy.json``."""
    cfg = result["config"]
    pre = result["pretrain"]
    sections = [
        f"Mean ± sample std (ddof 1) over {cfg['n_seeds']} seeds {result['seeds'][0]}..{result['seeds'][-1]}; "
        f"test loss = MSE on {cfg['n_test']} fresh samples of the finetuning task; each method's rate is the one "
        f"with the lowest mean log10 MSE on {cfg['n_val']} further fresh samples (validation, never the test "
        "samples); distance = L2 from the pretrained parameters.", "",
        ex.markdown_table(["pretraining", "train MSE", "test MSE", "large neurons"],
                          [["student", ex.mean_std(pre["train_loss"]), ex.mean_std(pre["test_loss"]),
                            f"{ex.mean_std(pre['large_neurons'])} of {cfg['student_width']}"]]), "",
        "## Small weights minus large gradients, paired by seed", "",
        "Mean difference [95 % t-interval]; the verdict is `lower` (small weights lower) or `higher` only when the "
        "whole interval is on that side of zero.", "",
        ex.markdown_table(["added neurons", "update", "masks", "metric", "difference", "verdict"],
                          [[r["added"], UPDATE_LABELS[r["update"]], r["regime"], r["metric"], _interval(r),
                            r["verdict"]] for r in result["comparisons"]]), ""]
    written = []
    columns = ("test_loss", "distance", "large_neuron_distance", "path_length", "ever_changed_fraction_W",
               "gradient_share")
    for k, task in result["tasks"].items():
        sections += [f"## {k} added neuron{'s' if k != '1' else ''}", "",
                     f"Pretrained student on the new task: test MSE {ex.mean_std(task['pretrained_test_loss'])}.", ""]
        for update, u in task["updates"].items():
            rows = [[LABELS[name], f"{m['lr']:g}" + (" (grid edge)" if m["at_grid_edge"] else ""),
                     *(_cell(m[c]) for c in columns)] for name, m in u["methods"].items()]
            sections += [f"### {UPDATE_LABELS[update]}", "",
                         ex.markdown_table(["method", "rate", "test loss", "distance", "large-neuron distance",
                                            "path length", "touched (W)", "gradient share"], rows), "",
                         "Mean log10 validation MSE at each rate tried:", "",
                         ex.markdown_table(["method", "rates: validation (test)"],
                                           [[LABELS[name], ", ".join(
                                               f"{r}: {v['val_log10_mse']:.2f} ({v['test_log10_mse']:.2f})"
                                               if v["val_log10_mse"] is not None else f"{r}: diverged"
                                               for r, v in m["rates"].items())]
                                            for name, m in u["methods"].items()]), ""]
            if result.get("figure") is not None and update in result["figure"]["finetuned"].get(k, {}):
                name = _figure_name(k, update)
                written.append(plot_task(result, k, update, os.path.join(out_dir, name)))
                sections += [f"![{k} added, {update}]({name})", ""]
    sections += ["## Settings", "", ex.settings_table(cfg)]
    title = "Toy teacher-student: small weights vs large gradients (Sec. 2.3, Fig. 3, Tables 8 and 9)"
    return [*written, ex.write_markdown(out_dir, "toy", title, result, sections)]


def _figure_name(k, update) -> str:
    return f"toy_{k}_added_{update}.png"


def plot_task(result: dict, k: str, update: str, path: str) -> Path:
    """Draw Fig. 3 for task ``k`` and update rule ``update`` (a panel per strategy) into ``path``
    (PNG, written atomically)."""
    plt = ex.pyplot()

    fig_data = result["figure"]
    T = fig_data["teacher_width"]
    Wt = torch.tensor(fig_data["teacher"]["W"], dtype=DTYPE)[: T + int(k)]
    at = torch.tensor(fig_data["teacher"]["a"], dtype=DTYPE)[: T + int(k)]
    Wp = torch.tensor(fig_data["pretrained"]["W"], dtype=DTYPE)
    ap = torch.tensor(fig_data["pretrained"]["a"], dtype=DTYPE)
    d = Wt.shape[1]
    if d == 2:
        P = torch.eye(2, dtype=DTYPE)
    else:  # plane of the first two teacher neurons
        q, _ = torch.linalg.qr(Wt[:2].T)
        P = q.T

    def pts(W, a):
        return ((a.abs()[:, None] * W) @ P.T).numpy()

    order = ["small_weights", "large_gradients", "full", "small_weights_static", "large_gradients_static"]
    finetuned = fig_data["finetuned"][k][update]
    strategies = sorted(finetuned, key=order.index)
    ncols = min(3, len(strategies))
    nrows = math.ceil(len(strategies) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 4.4 * nrows + 0.6), squeeze=False)
    for ax in axes.flat[len(strategies):]:
        ax.axis("off")
    used = axes.flat[: len(strategies)]
    colour = {True: "tab:red", False: "tab:blue"}
    tp = pts(Wt, at)
    pp = pts(Wp, ap)
    lim = 1.25 * max(1.0, float(abs(tp).max()), float(abs(pp).max()))
    for ax, s in zip(used, strategies):
        Wf = torch.tensor(finetuned[s]["W"], dtype=DTYPE)
        af = torch.tensor(finetuned[s]["a"], dtype=DTYPE)
        fp = pts(Wf, af)
        lim = max(lim, 1.1 * float(abs(fp).max()))
        for i in range(tp.shape[0]):  # a handful of teacher arrows
            new = i >= T
            ax.annotate("", xy=(tp[i, 0], tp[i, 1]), xytext=(0, 0),
                        arrowprops={"arrowstyle": "-|>", "color": colour[bool(at[i] > 0)], "lw": 2.0,
                                    "linestyle": "--" if new else "-", "alpha": 0.85})
            ax.annotate("new" if new else "teacher", xy=(tp[i, 0], tp[i, 1]), xytext=(4, 4),
                        textcoords="offset points", fontsize=8)
        ax.plot([pp[:, 0], fp[:, 0]], [pp[:, 1], fp[:, 1]], color="0.6", lw=0.8, zorder=1)
        cp = [colour[bool(v > 0)] for v in ap]
        cf = [colour[bool(v > 0)] for v in af]
        ax.scatter(pp[:, 0], pp[:, 1], facecolors="none", edgecolors=cp, s=36, lw=1.2, zorder=2)
        ax.scatter(fp[:, 0], fp[:, 1], c=cf, s=14, zorder=3)
        m, i = result["tasks"][k]["updates"][update]["methods"][s], result["config"]["figure_seed"]
        loss, dist = m["test_loss"]["values"][i], m["distance"]["values"][i]
        ax.set_title(f"{LABELS[s]}, lr {m['lr']:g}\nseed {fig_data['seed']}: test MSE "
                     + (f"{loss:.2e}, distance {dist:.2f}" if loss is not None else "diverged"), fontsize=9)
        ax.axhline(0, color="0.85", lw=0.6, zorder=0)
        ax.axvline(0, color="0.85", lw=0.6, zorder=0)
        ax.set_aspect("equal")
    for ax in used:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="tab:red", lw=2, label="teacher, a* > 0"),
               Line2D([], [], color="tab:blue", lw=2, label="teacher, a* < 0"),
               Line2D([], [], color="k", lw=2, ls="--", label="added neuron"),
               Line2D([], [], marker="o", ls="", mfc="none", mec="k", label="pretrained |a_j| w_j"),
               Line2D([], [], marker="o", ls="", color="k", ms=4, label="finetuned (red a>0, blue a<0)")]
    fig.legend(handles=handles, loc="lower center", ncol=3 if ncols < 3 else 5, fontsize=7.5, frameon=False)
    fig.suptitle(f"{k} added neuron{'s' if k != '1' else ''}, {UPDATE_LABELS[update]}, fraction "
                 f"{result['config']['fraction']:g} per layer",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.5 / (4.4 * nrows + 0.6), 1, 1 - 0.3 / (4.4 * nrows + 0.6)), h_pad=2.5)
    return ex.save_figure(fig, path, dpi=130)


def main(config: ToyConfig | None = None, progress=True, command: str | None = None) -> list[Path]:
    """Runs with ``config`` (default: ``ToyConfig()``), writes ``toy.json`` to ``config.out_dir`` and
    renders from it."""
    config = config or ToyConfig()

    def run_with_command(cfg):
        return {"command": command or "nanoadam reproduce toy", "machine": ex.machine_info(),
                **run(cfg, progress, cells_dir=os.path.join(cfg.out_dir, "cells"))}

    return ex.run_and_render(run_with_command, render, config, config.out_dir, "toy")


if __name__ == "__main__":
    main()
