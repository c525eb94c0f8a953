"""DCTR weights: a classifier between generated and real samples as a density ratio.

A classifier f trained with binary cross entropy between generated samples
(label 0) and real samples (label 1) approaches f = p_1 pi_1 / (p_0 pi_0 + p_1 pi_1),
so f / (1 - f) = exp(logit) is the density ratio p_real / p_generated up to the
class prior pi_1 / pi_0 (LaSeR, arXiv:2106.00792, sec. 3; DCTR, arXiv:1907.08209).

Choices (the LaSeR reference code uses an 8 x 96 LeakyReLU MLP trained for a fixed
number of epochs and corrects, calibrates and clips nothing):

- architecture: a 3 x 64 MLP with SiLU. SiLU makes log w(x) smooth, so its
  gradient (used by HMC through the generator) is continuous; LeakyReLU gives a
  piecewise-constant gradient field that makes leapfrog trajectories jerky.
  Three layers of 64 resolve the 2-D toys and cost a fraction of 8 x 96 on a CPU.
- early stopping on a validation split (the best validation loss is kept), so
  the ratio is not over-fitted to fluctuations of the training samples; not
  before ``min_epochs``, because against a decent generator the loss sits at
  ln 2 for several epochs before it drops (patience alone stops untrained).
- calibration: the class-balance prior (total sample weight per class) is always
  removed, so unequal sample sizes do not scale w. Optionally Platt scaling
  (logit -> a logit + b, fitted on the validation split; default) or a single
  temperature; both only correct over- or under-confidence, and Platt's a ~ 1
  for a well-trained classifier.
- clipping: log w is clipped above at log(max_weight) (default 100, relative to
  the mean generated weight 1). Where the classifier extrapolates (far from
  both samples) its logit can grow without bound; the clip keeps single
  weights from dominating a weighted sample and keeps HMC chains from running
  to such regions. No lower clip: w -> 0 is exactly how DCTR removes the
  generator's spurious mass (the bridges between modes, the filled holes).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ClassifierConfig:
    """How the DCTR classifier is built and trained."""

    hidden: tuple[int, ...] = (64, 64, 64)
    epochs: int = 40
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 0.0
    validation_fraction: float = 0.1
    patience: int = 5  # epochs without a better validation loss before stopping
    min_epochs: int = 0  # no early stop before this many epochs (the loss can sit at ln 2 before it drops)
    calibration: Literal["none", "temperature", "platt"] = "platt"
    max_weight: float | None = 100.0  # upper clip of w (None: no clip)


class CalibratedRatio(nn.Module):
    """A density ratio from a classifier's logit: log w(x) = a (logit(x) + log_prior) + b + log_offset,
    clipped above at log(max_weight). Subclasses give :meth:`logit`; :class:`DensityRatio`
    (an MLP) and :class:`~caloman.refinement.trees.TreeDensityRatio` (boosted trees)."""

    def __init__(self, max_weight: float | None = None) -> None:
        super().__init__()
        self.register_buffer("slope", torch.tensor(1.0))  # calibration: a * (logit + log_prior) + b
        self.register_buffer("bias", torch.tensor(0.0))
        self.register_buffer("log_prior", torch.tensor(0.0))  # log(W_generated / W_real)
        self.register_buffer("log_offset", torch.tensor(0.0))  # constant added to log w
        self.max_weight = max_weight

    def logit(self, x: Tensor) -> Tensor:
        """Raw classifier logit, (n, d) -> (n,)."""
        raise NotImplementedError

    def calibrated(self, logit: Tensor) -> Tensor:
        """Calibrated, prior-corrected, clipped log w from raw logits (n,) -> (n,)."""
        log_w = self.slope * (logit + self.log_prior) + self.bias + self.log_offset
        if self.max_weight is not None:
            log_w = log_w.clamp(max=math.log(self.max_weight))
        return log_w

    def log_weight(self, x: Tensor) -> Tensor:
        """Calibrated, prior-corrected, clipped log w(x), (n, d) -> (n,)."""
        return self.calibrated(self.logit(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.log_weight(x)

    @torch.no_grad()
    def weight(self, x: Tensor, batch_size: int = 65536) -> Tensor:
        """w(x) for x (n, d), evaluated in batches without gradients; (n,)."""
        return torch.cat([self.log_weight(x[i:i + batch_size]).exp() for i in range(0, len(x), batch_size)])

    def set_calibration(self, fitted: tuple[float, float] | None) -> None:
        """Store a :func:`fit_calibration` result (None keeps the uncalibrated ratio)."""
        if fitted is not None:
            self.slope.fill_(fitted[0])
            self.bias.fill_(fitted[1])


class DensityRatio(CalibratedRatio):
    """w(x) ~ p_real(x) / p_generated(x) from a trained MLP classifier.

    ``log_weight(x)`` for x of shape (n, d) returns (n,), differentiable in x;
    ``weight(x)`` is its exponential. ``history`` holds per-epoch losses.
    """

    def __init__(self, features: int, hidden: tuple[int, ...], max_weight: float | None = None) -> None:
        super().__init__(max_weight)
        layers: list[nn.Module] = []
        width = features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.SiLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)
        self.register_buffer("shift", torch.zeros(features))
        self.register_buffer("scale", torch.ones(features))
        self.history: list[dict[str, float]] = []

    def logit(self, x: Tensor) -> Tensor:
        """Raw classifier logit, (n, d) -> (n,)."""
        return self.net((x - self.shift) / self.scale).squeeze(-1)


@dataclass
class LabelledSample:
    """Points x (n, d) with class labels (n,) in {0, 1} and per-sample weights (n,)."""

    x: Tensor
    label: Tensor
    weight: Tensor


def _ones_if_none(w: Tensor | None, n: int, like: Tensor) -> Tensor:
    return torch.ones(n, dtype=like.dtype) if w is None else torch.as_tensor(w, dtype=like.dtype).reshape(n)


def split_indices(n: int, fraction: float, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """A random (train, validation) split of range(n), the validation part a fraction of n (at least 1)."""
    order = torch.randperm(n, generator=generator)
    n_val = max(1, int(round(fraction * n)))
    return order[n_val:], order[:n_val]


def _labelled(x0: Tensor, w0: Tensor, x1: Tensor, w1: Tensor) -> LabelledSample:
    return LabelledSample(torch.cat([x0, x1]),
                     torch.cat([torch.zeros(len(x0), dtype=x0.dtype), torch.ones(len(x1), dtype=x0.dtype)]),
                     torch.cat([w0, w1]))


def fit_density_ratio(generated: Tensor, real: Tensor, config: ClassifierConfig = ClassifierConfig(), *,
                      generated_weights: Tensor | None = None, real_weights: Tensor | None = None,
                      generator: torch.Generator | None = None) -> DensityRatio:
    """Train the DCTR classifier: ``generated`` (n0, d) label 0 against ``real`` (n1, d)
    label 1, each optionally with per-sample weights (n0,), (n1,). Returns the
    :class:`DensityRatio` w(x) ~ p_real / p_generated."""
    generated, real = torch.as_tensor(generated), torch.as_tensor(real, dtype=torch.as_tensor(generated).dtype)
    w0 = _ones_if_none(generated_weights, len(generated), generated)
    w1 = _ones_if_none(real_weights, len(real), generated)
    tr0, va0 = split_indices(len(generated), config.validation_fraction, generator)
    tr1, va1 = split_indices(len(real), config.validation_fraction, generator)
    train = _labelled(generated[tr0], w0[tr0], real[tr1], w1[tr1])
    val = _labelled(generated[va0], w0[va0], real[va1], w1[va1])
    return train_ratio(train, val, config, generator=generator)


def _weighted_bce(logit: Tensor, label: Tensor, weight: Tensor) -> Tensor:
    loss = nn.functional.binary_cross_entropy_with_logits(logit, label, reduction="none")
    return (weight * loss).sum() / weight.sum()


def train_ratio(train: LabelledSample, val: LabelledSample, config: ClassifierConfig, *,
                generator: torch.Generator | None = None) -> DensityRatio:
    """Train and calibrate on already split labelled sets (see :func:`fit_density_ratio`)."""
    features = train.x.shape[1]
    model = DensityRatio(features, config.hidden, config.max_weight).to(train.x.dtype)
    model.shift.copy_(train.x.mean(0))
    model.scale.copy_(train.x.std(0).clamp_min(1e-12))
    optimiser = torch.optim.Adam(model.net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    best, best_state, stale = math.inf, copy.deepcopy(model.state_dict()), 0
    n = len(train.x)
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for i in range(0, n, config.batch_size):
            idx = order[i:i + config.batch_size]
            loss = _weighted_bce(model.logit(train.x[idx]), train.label[idx], train.weight[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(idx)
        with torch.no_grad():
            val_loss = float(_weighted_bce(model.logit(val.x), val.label, val.weight))
        model.history.append({"epoch": epoch + 1, "train_loss": total / n, "val_loss": val_loss})
        if val_loss < best - 1e-6:
            best, best_state, stale = val_loss, copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= config.patience and epoch + 1 >= config.min_epochs:
                break
    history = model.history
    model.load_state_dict(best_state)
    model.history = history
    model.eval()
    # f/(1-f) = (p1/p0) (W1/W0): remove the class prior (total weight per class, as trained)
    model.log_prior.fill_(math.log(_class_weight(train, 0) / _class_weight(train, 1)))
    _calibrate(model, val, config.calibration)
    return model


def _class_weight(data: LabelledSample, label: int) -> float:
    return float(data.weight[data.label == label].sum())


def _calibrate(model: DensityRatio, val: LabelledSample, method: str) -> None:
    """Calibrate on the validation split (see :func:`fit_calibration`)."""
    with torch.no_grad():
        u = model.logit(val.x) + model.log_prior
    model.set_calibration(fit_calibration(u, val.label, val.weight, method))


def fit_calibration(log_ratio: Tensor, label: Tensor, weight: Tensor, method: str) -> tuple[float, float] | None:
    """Fit log w = a u + b to held-out points by weighted BCE; returns (a, b), or None
    for ``method`` "none" or a degenerate fit (then the uncalibrated ratio is kept).

    ``log_ratio`` u (n,) is the classifier's prior-free log ratio on points it did not
    train on, ``label`` (n,) 1 for real, ``weight`` (n,). Their classifier logit is
    a u + b + log(W1/W0) (W the total weight per class); Platt fits a and b,
    "temperature" only a (= 1 / T). Both correct over- or under-confidence only.
    """
    if method == "none":
        return None
    u = log_ratio.detach()
    balance = math.log(float(weight[label == 1].sum()) / float(weight[label == 0].sum()))
    a = torch.ones((), dtype=u.dtype, requires_grad=True)
    b = torch.zeros((), dtype=u.dtype, requires_grad=method == "platt")
    optimiser = torch.optim.LBFGS([a, b] if method == "platt" else [a], lr=0.5, max_iter=100)

    def closure() -> Tensor:
        optimiser.zero_grad()
        loss = _weighted_bce(a * u + b + balance, label, weight)
        loss.backward()
        return loss

    optimiser.step(closure)
    a, b = a.detach(), b.detach()
    if not (torch.isfinite(a) and torch.isfinite(b)) or float(a) <= 0:
        return None  # e.g. an uninformative classifier
    return float(a), float(b)


def weight_summary(w: Tensor | np.ndarray, *, largest: int = 5) -> dict[str, object]:
    """Effective sample size fraction (sum w)^2 / (n sum w^2), the largest weights and quantiles of w (n,)."""
    w = np.asarray(torch.as_tensor(w).detach().cpu(), dtype=np.float64).reshape(-1)
    if w.size == 0:
        raise ValueError("weight_summary: no weights")
    ess = float(w.sum() ** 2 / (w.size * np.square(w).sum())) if np.square(w).sum() > 0 else 0.0
    qs = (0.001, 0.01, 0.1, 0.5, 0.9, 0.99, 0.999)
    return {
        "n": int(w.size),
        "ess_fraction": ess,
        "mean": float(w.mean()),
        "largest": [float(v) for v in np.sort(w)[::-1][:largest]],
        "quantiles": {str(q): float(np.quantile(w, q)) for q in qs},
    }
