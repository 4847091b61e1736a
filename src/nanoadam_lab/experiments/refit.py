"""How much of an earlier task a finetuned body still holds, three ways (continual finetuning).

Scoring task 1 after task 2 with task 1's own head reloaded (the paper's measure) mixes two
things: whether the body still separates task 1's classes, and whether it still places them
where the old head expects. Task 2 trains a new, random head on a body shared with the old one,
and the body moves its features (the classifier's input) as a whole to fit task 2's class prior
through that head; a shift of every feature by the same vector moves every old logit by the same
offset, and the old head then predicts one class while the classes stay as separable as before.
(Measured here on MiniLM: after 137 CoLA steps of NanoAdam at 1e-4, SST-2 with its own head fell
from 86.7 to 52.8, nearly all one class, while the same head with its offset refit scored 85.8
and a linear probe refit on the features 85.5.) So besides the old head:

* ``offset``: the old head with only its output offset refit (a bias added to the logits, fit on
  task 1's training examples with the head's weights fixed): is the direction it reads intact?
* ``probe``: a linear model refit on the features of task 1's training examples (scikit-learn's
  logistic regression, ridge for a regression task, on standardized features): how much of task 1
  can a new head still read from the body?

Both are fit on training examples only and scored on the held-out slice and the validation set.
"""

from __future__ import annotations

import numpy as np
import torch


def refit_offset(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The offset ``b`` that fits ``logits + b`` to ``labels`` best (cross-entropy for classes,
    squared error for a regression's single output); the logits stay otherwise as they are."""
    logits = logits.detach().float()
    if logits.shape[1] == 1:
        # A regression scored by correlation (STS-B) is unchanged by an offset: this column then
        # equals the old head's, by construction.
        return (labels.float() - logits[:, 0]).mean().reshape(1)
    offset = torch.zeros(logits.shape[1], requires_grad=True)
    solver = torch.optim.LBFGS([offset], lr=1.0, max_iter=100, tolerance_grad=1e-9, tolerance_change=1e-12,
                               line_search_fn="strong_wolfe")

    def closure():
        solver.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits + offset, labels)
        loss.backward()
        return loss

    with torch.enable_grad():  # callers score under no_grad; the fit needs the graph
        solver.step(closure)
    return offset.detach()


class LinearProbe:
    """A linear model fit on frozen features: logistic regression (classes) or ridge (a score),
    after standardizing each feature on the training examples."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, num_labels: int):
        from sklearn.linear_model import LogisticRegression, Ridge
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        self.num_labels = num_labels
        # scikit-learn's default strengths (C=1, alpha=1) on standardized features, not tuned: tuning
        # would need a split of its own, and one fixed probe reads every method's body the same way,
        # so the methods' refit scores pair fairly. It measures what a plain new head can read.
        model = Ridge(alpha=1.0) if num_labels == 1 else LogisticRegression(max_iter=2000)
        self.model = make_pipeline(StandardScaler(), model).fit(features.double().numpy(), labels.numpy())

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        x = features.double().numpy()
        if self.num_labels == 1:
            return torch.from_numpy(self.model.predict(x)).float().reshape(-1, 1)
        out = np.full((len(x), self.num_labels), -np.inf)
        out[:, self.model.classes_] = self.model.predict_log_proba(x)  # a class absent from training: never predicted
        return torch.from_numpy(out).float()
