"""DCTR weights from gradient-boosted trees, cross-fitted and calibrated.

The MLP of :mod:`caloman.refinement.weights` is weaker than the boosted trees of the
strong test (:mod:`caloman.metrics.strong`) that judge a reweighted generator: what
the trees still see, weights from an MLP cannot remove. Here the DCTR classifier is
the same kind of model, scikit-learn's
:class:`~sklearn.ensemble.HistGradientBoostingClassifier` (log loss, early stopping
on an internal validation split), and w = f / (1 - f) as in
:mod:`~caloman.refinement.weights`:

- cross-fitting: the samples are split into k stratified folds; model j trains on
  all folds but j. Every training sample's weight (the ones ``refine`` reports and
  the latent weights are regressed on) comes from the model that did not see it,
  so in-sample over-fitting cannot shrink the weights of the generated showers the
  trees memorised. A new point (a shower generated later) gets the mean logit of
  the k models (an ensemble, each model having seen (k-1)/k of the data);
- calibration: the class prior (total sample weight per class) is removed, then
  Platt scaling (logit -> a logit + b) is fitted on the out-of-fold logits of *all*
  samples (:func:`~caloman.refinement.weights.fit_calibration`): held-out points,
  and every sample, where the MLP has only its 10 % validation split;
- clipping: log w is clipped above at log(max_weight), 100 by default (relative to
  the mean generated weight 1), no lower clip: the MLP's policy and reasons.
  A tree's output is piecewise constant and bounded by its leaves, so, unlike an
  MLP, it does not grow far from the data; the clip guards against few-sample
  leaves of a short-of-data energy.

No pickle: the fitted trees are read out of scikit-learn's predictors (node
arrays: feature, threshold, children, leaf value) into tensors, stored with the
refined run, and evaluated by scikit-learn's compiled tree walker rebuilt from
them (:meth:`TreeDensityRatio.logit`). Both directions use scikit-learn's private
tree layout (``_predictors``, ``TreePredictor``, stable since 0.21); the tests check
the round trip against the fitted model's own ``decision_function``, so a change
of that layout fails the tests, not silently the weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from threadpoolctl import threadpool_limits
from torch import Tensor

from caloman.errors import ConfigError
from caloman.progress import ProgressBar
from caloman.refinement.weights import CalibratedRatio, fit_calibration


@dataclass(frozen=True)
class TreeClassifierConfig:
    """How the boosted-tree DCTR classifier is built, cross-fitted and calibrated.

    Attributes:
        n_folds: k of the cross-fitting (k models, each scoring the fold it did not see).
        max_iter: boosting iterations at most per model (early stopping usually ends sooner).
        learning_rate: shrinkage of each tree.
        max_leaf_nodes: leaves per tree.
        min_samples_leaf: fewest samples in a leaf (regularises the ratio in sparse regions).
        l2_regularization: L2 penalty on the leaf values.
        n_iter_no_change: early-stopping patience on the internal validation loss.
        validation_fraction: part of each training fold used for early stopping.
        calibration: "platt" (default), "temperature" or "none", fitted on out-of-fold logits.
        max_weight: upper clip of w (None: no clip).
        max_threads: OpenMP threads of the trees.
    """

    n_folds: int = 3
    max_iter: int = 200
    learning_rate: float = 0.1
    max_leaf_nodes: int = 31
    min_samples_leaf: int = 20
    l2_regularization: float = 0.0
    n_iter_no_change: int = 10
    validation_fraction: float = 0.1
    calibration: Literal["none", "temperature", "platt"] = "platt"
    max_weight: float | None = 100.0
    max_threads: int = 1

    def __post_init__(self) -> None:
        problems = []
        if self.n_folds < 2:
            problems.append(f"n_folds must be >= 2, got {self.n_folds}")
        if min(self.max_iter, self.min_samples_leaf, self.n_iter_no_change, self.max_threads) < 1:
            problems.append("max_iter, min_samples_leaf, n_iter_no_change and max_threads must be >= 1")
        if self.max_leaf_nodes < 2 or not self.learning_rate > 0 or self.l2_regularization < 0:
            problems.append("max_leaf_nodes must be >= 2, learning_rate > 0, l2_regularization >= 0")
        if not 0 < self.validation_fraction < 0.5:
            problems.append(f"validation_fraction must lie in (0, 0.5), got {self.validation_fraction}")
        if self.calibration not in ("none", "temperature", "platt"):
            problems.append(f"calibration must be none, temperature or platt, got {self.calibration!r}")
        if self.max_weight is not None and not self.max_weight > 1:
            problems.append(f"max_weight must be > 1 or None, got {self.max_weight}")
        if problems:
            raise ConfigError("invalid TreeClassifierConfig: " + "; ".join(problems))


class TreeDensityRatio(CalibratedRatio):
    """w(x) ~ p_real(x) / p_generated(x) from k boosted-tree models (their mean logit).

    The trees are stored padded to one node count M, flattened: node ``t * M + i`` is
    node i of tree t; a leaf (and padding) points to itself. Buffers (T trees, k models, M nodes):

    - ``feature`` (T * M,) int64, ``threshold`` (T * M,) float64: go left when
      x[feature] <= threshold, or when x[feature] is NaN and ``missing_left``;
    - ``left``, ``right`` (T * M,) int64 flat child indices; ``value`` (T * M,) float64;
    - ``tree_model`` (T,) int64: the model each tree belongs to; ``baseline`` (k,) float64.

    ``logit(x)`` (n, d) -> (n,) is the mean over the k models of their raw decision
    function; it is not differentiable in x (HMC uses the latent weights instead).
    """

    def __init__(self, n_trees: int, n_nodes: int, n_models: int, max_weight: float | None = None) -> None:
        super().__init__(max_weight)
        size = n_trees * n_nodes
        self.n_nodes = n_nodes
        self.register_buffer("feature", torch.zeros(size, dtype=torch.int64))
        self.register_buffer("threshold", torch.zeros(size, dtype=torch.float64))
        self.register_buffer("missing_left", torch.zeros(size, dtype=torch.bool))
        self.register_buffer("left", torch.zeros(size, dtype=torch.int64))
        self.register_buffer("right", torch.zeros(size, dtype=torch.int64))
        self.register_buffer("value", torch.zeros(size, dtype=torch.float64))
        self.register_buffer("tree_model", torch.zeros(n_trees, dtype=torch.int64))
        self.register_buffer("baseline", torch.zeros(n_models, dtype=torch.float64))
        self._predictors: list[Any] | None = None  # scikit-learn's compiled walkers, built from the buffers

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], max_weight: float | None = None) -> TreeDensityRatio:
        """Rebuild from a :meth:`state_dict` (the shapes are read from it)."""
        try:
            n_trees, n_models = len(state["tree_model"]), len(state["baseline"])
            n_nodes = len(state["feature"]) // max(1, n_trees)
        except KeyError as exc:
            raise ConfigError(f"the tree classifier's tensors lack {exc}") from exc
        ratio = cls(n_trees, n_nodes, n_models, max_weight)
        ratio.load_state_dict(state)
        return ratio.eval()

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        self._predictors = None
        return super().load_state_dict(*args, **kwargs)

    @property
    def n_models(self) -> int:
        return len(self.baseline)

    def _walkers(self) -> list[Any]:
        """One scikit-learn ``TreePredictor`` per tree, rebuilt from the buffers (its compiled
        walk is several times faster than a vectorised one in torch)."""
        if self._predictors is None:
            from sklearn.ensemble._hist_gradient_boosting.common import PREDICTOR_RECORD_DTYPE
            from sklearn.ensemble._hist_gradient_boosting.predictor import TreePredictor

            no_categories = np.zeros((0, 8), dtype=np.uint32)
            m = self.n_nodes
            fields = {name: getattr(self, name).cpu().numpy().reshape(-1, m)
                      for name in ("feature", "threshold", "missing_left", "left", "right", "value")}
            self._predictors = []
            for t in range(len(self.tree_model)):
                nodes = np.zeros(m, dtype=PREDICTOR_RECORD_DTYPE)
                own = t * m + np.arange(m)
                leaf = fields["left"][t] == own
                nodes["is_leaf"] = leaf
                nodes["value"] = fields["value"][t]
                nodes["feature_idx"] = np.where(leaf, 0, fields["feature"][t])
                nodes["num_threshold"] = fields["threshold"][t]
                nodes["missing_go_to_left"] = fields["missing_left"][t]
                nodes["left"] = np.where(leaf, 0, fields["left"][t] - t * m)
                nodes["right"] = np.where(leaf, 0, fields["right"][t] - t * m)
                self._predictors.append(TreePredictor(nodes, no_categories, no_categories))
        return self._predictors

    @torch.no_grad()
    def model_logits(self, x: Tensor) -> Tensor:
        """Each model's raw logit, (n, d) -> (n, k) float64."""
        rows = np.ascontiguousarray(torch.as_tensor(x).detach().to("cpu", torch.float64).numpy())
        out = np.tile(self.baseline.cpu().numpy(), (len(rows), 1))
        no_categories, no_map = np.zeros((0, 8), dtype=np.uint32), np.zeros(0, dtype=np.uint32)
        threads = torch.get_num_threads()  # the CLI's --threads
        for model, walker in zip(self.tree_model.tolist(), self._walkers(), strict=True):
            out[:, model] += walker.predict(rows, no_categories, no_map, threads)
        return torch.from_numpy(out).to(self.baseline.device)

    def logit(self, x: Tensor) -> Tensor:
        """The k models' mean raw logit, (n, d) -> (n,) float64."""
        return self.model_logits(x).mean(1)


def _trees_of(models: list[HistGradientBoostingClassifier]) -> list[tuple[int, np.ndarray]]:
    """(model index, node records) of every tree; scikit-learn's private predictor layout."""
    trees = []
    for m, model in enumerate(models):
        for predictors in model._predictors:  # one list per iteration, one tree per class (1 for binary)
            nodes = predictors[0].nodes
            if nodes["is_categorical"].any():
                raise ConfigError("categorical splits are not supported by the tree classifier")
            trees.append((m, nodes))
    return trees


def pack_trees(models: list[HistGradientBoostingClassifier], max_weight: float | None = None) -> TreeDensityRatio:
    """The fitted binary classifiers ``models`` as one :class:`TreeDensityRatio` (uncalibrated)."""
    trees = _trees_of(models)
    n_nodes = max(len(nodes) for _, nodes in trees)
    ratio = TreeDensityRatio(len(trees), n_nodes, len(models), max_weight)
    size = len(trees) * n_nodes
    feature, missing = np.zeros(size, np.int64), np.ones(size, bool)
    threshold, value = np.full(size, np.inf), np.zeros(size)
    left = np.arange(size, dtype=np.int64)  # padding and leaves point to themselves
    right = left.copy()
    for t, (_, nodes) in enumerate(trees):
        offset, k = t * n_nodes, len(nodes)
        split = ~nodes["is_leaf"].astype(bool)
        idx = offset + np.flatnonzero(split)
        feature[idx] = nodes["feature_idx"][split]
        threshold[idx] = nodes["num_threshold"][split]
        missing[idx] = nodes["missing_go_to_left"][split].astype(bool)
        left[idx] = offset + nodes["left"][split].astype(np.int64)
        right[idx] = offset + nodes["right"][split].astype(np.int64)
        value[offset:offset + k] = np.where(split, 0.0, nodes["value"])
    with torch.no_grad():
        for name, array in (("feature", feature), ("threshold", threshold), ("missing_left", missing),
                            ("left", left), ("right", right), ("value", value),
                            ("tree_model", np.array([m for m, _ in trees], np.int64)),
                            ("baseline", np.array([float(np.ravel(m._baseline_prediction)[0]) for m in models]))):
            getattr(ratio, name).copy_(torch.as_tensor(array))
    return ratio


@dataclass
class TreeFit:
    """A fitted :class:`TreeDensityRatio` and the out-of-fold log weights of its training samples."""

    ratio: TreeDensityRatio
    generated_log_weight: Tensor  # (n0,) calibrated, clipped; each from the model that did not train on it
    real_log_weight: Tensor  # (n1,)
    iterations: list[int]  # boosting iterations of each model
    out_of_fold_auc: float  # AUC of the out-of-fold scores (0.5: the trees cannot tell the classes apart)


def _make_model(config: TreeClassifierConfig, seed: int) -> HistGradientBoostingClassifier:
    return HistGradientBoostingClassifier(
        max_iter=config.max_iter, learning_rate=config.learning_rate, max_leaf_nodes=config.max_leaf_nodes,
        min_samples_leaf=config.min_samples_leaf, l2_regularization=config.l2_regularization,
        early_stopping=True, validation_fraction=config.validation_fraction,
        n_iter_no_change=config.n_iter_no_change, random_state=seed)


def fit_tree_density_ratio(generated: Tensor | np.ndarray, real: Tensor | np.ndarray,
                           config: TreeClassifierConfig = TreeClassifierConfig(), *,
                           generated_weights: Tensor | np.ndarray | None = None,
                           real_weights: Tensor | np.ndarray | None = None, seed: int = 0) -> TreeFit:
    """Cross-fit the boosted-tree DCTR classifier: ``generated`` (n0, d) label 0 against
    ``real`` (n1, d) label 1, optional per-sample weights (n0,), (n1,). Returns the
    calibrated :class:`TreeDensityRatio` w(x) ~ p_real / p_generated and every sample's
    out-of-fold log weight."""
    x0 = np.asarray(torch.as_tensor(generated).detach().cpu(), dtype=np.float64)
    x1 = np.asarray(torch.as_tensor(real).detach().cpu(), dtype=np.float64)
    n0, n1 = len(x0), len(x1)
    if min(n0, n1) < 5 * config.n_folds:
        raise ConfigError(f"{n0} generated and {n1} real samples are too few for a {config.n_folds}-fold tree "
                          "classifier; give more")
    x = np.concatenate([x0, x1])
    label = np.concatenate([np.zeros(n0), np.ones(n1)])
    weighted = generated_weights is not None or real_weights is not None
    weight = np.concatenate([np.ones(n0) if generated_weights is None else np.asarray(generated_weights, float),
                             np.ones(n1) if real_weights is None else np.asarray(real_weights, float)])
    oof = np.empty(len(x))
    models, iterations = [], []
    folds = StratifiedKFold(n_splits=config.n_folds, shuffle=True, random_state=seed)
    with threadpool_limits(limits=config.max_threads, user_api="openmp"), \
            ProgressBar(config.n_folds, desc="DCTR classifier (trees)", unit="fold") as bar:
        for fold, (train, test) in enumerate(folds.split(x, label)):
            model = _make_model(config, seed + fold).fit(x[train], label[train],
                                                         sample_weight=weight[train] if weighted else None)
            oof[test] = model.decision_function(x[test])
            models.append(model)
            iterations.append(int(model.n_iter_))
            bar.update()
    ratio = pack_trees(models, config.max_weight)
    label_t, weight_t = torch.as_tensor(label), torch.as_tensor(weight)
    # f/(1-f) = (p1/p0) (W1/W0): remove the class prior (total weight per class)
    ratio.log_prior.fill_(math.log(float(weight[label == 0].sum()) / float(weight[label == 1].sum())))
    u = torch.as_tensor(oof) + ratio.log_prior
    ratio.set_calibration(fit_calibration(u, label_t, weight_t, config.calibration))
    with torch.no_grad():
        log_w = ratio.calibrated(torch.as_tensor(oof))
    auc = float(roc_auc_score(label, oof, sample_weight=weight if weighted else None))
    return TreeFit(ratio=ratio.eval(), generated_log_weight=log_w[:n0], real_log_weight=log_w[n0:],
                   iterations=iterations, out_of_fold_auc=auc)
