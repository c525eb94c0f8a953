"""Conditional normalizing flows on small feature vectors (latent codes, layer
energies), built from zuko.

A :class:`ConditionalFlow` is a stack of rational-quadratic spline (RQS)
transforms (Durkan et al. 2019, arXiv:1906.04032) whose parameters come from a
hypernetwork fed with the untouched half of the features and the condition.
Coupling transforms (the default) invert in one network pass each, so
sampling costs as much as density evaluation; fully autoregressive transforms
(``coupling=False``, CaloFlow's MAF) need one pass per feature to sample.

zuko defines the maths. For coupling flows both directions run fused loops over
the transforms that skip zuko's lazy-distribution construction: the density
(:meth:`ConditionalFlow.log_prob`, what training spends a flow stage on; the
spline in fewer operations, :func:`rqs_forward`) and sampling
(:meth:`ConditionalFlow.sample`, the spline inverse in fewer operations); batches of up to
``NUMPY_MAX_BATCH`` on the CPU run it in numpy. At batch 1 per-call overhead,
not arithmetic, is what sampling time is made of (the CaloMan paper's sampler
spends 6.2 ms per shower there). Both fused paths are checked against zuko's
inverse in the tests.

Hypernetworks: zuko's MLP (the default, fewest operations per call) or the
paper's residual network whose blocks are gated by the condition
(:class:`ResidualGLUNet`; torch path only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache, partial

import numpy as np
import torch
from torch import Tensor, nn
from torch.distributions import Distribution
from zuko.distributions import DiagNormal
from zuko.flows.autoregressive import MaskedAutoregressiveTransform
from zuko.flows.coupling import GeneralCouplingTransform
from zuko.lazy import Flow, UnconditionalDistribution
from zuko.transforms import MonotonicRQSTransform

#: Hypernetworks that produce each transform's spline parameters.
HYPERNETS = ("mlp", "residual-glu")

#: zuko's default minimum spline slope.
SPLINE_SLOPE = 1e-3


class ResidualGLUNet(nn.Module):
    """Residual network whose blocks are gated by the condition (GLU), as in the
    CaloMan paper's flow (nflows' ``ResidualNet``; He et al. 2016, Dauphin et al.
    2017). zuko only offers plain and masked MLPs, hence this module.

    Input (n, features + context): the features and the condition concatenated
    last, as zuko's coupling transform passes them. Output (n, out_features).
    """

    def __init__(self, features: int, context: int, out_features: int, hidden: int, blocks: int = 2) -> None:
        super().__init__()
        self.features = features
        self.context = context
        self.initial = nn.Linear(features + context, hidden)
        self.blocks = nn.ModuleList(
            nn.ModuleList([nn.Linear(hidden, hidden), nn.Linear(hidden, hidden), nn.Linear(context, hidden)])
            for _ in range(blocks)
        )
        self.final = nn.Linear(hidden, out_features)
        for block in self.blocks:
            # Blocks start as the identity so a deep stack trains like a shallow one.
            nn.init.uniform_(block[1].weight, -1e-3, 1e-3)
            nn.init.zeros_(block[1].bias)

    def forward(self, inputs: Tensor) -> Tensor:
        condition = inputs[..., self.features:]
        h = self.initial(inputs)
        for first, second, gate in self.blocks:
            t = second(torch.relu(first(torch.relu(h))))
            if self.context > 0:
                t = t * torch.sigmoid(gate(condition))
            h = h + t
        return self.final(h)


def coupling_masks(features: int, transforms: int) -> list[Tensor]:
    """Coupling masks (True = conditioning half) that alternate a checkerboard
    with a front/back split, so every feature is transformed given every other
    one within four transforms."""
    index = torch.arange(features)
    patterns = [index % 2 == 0, index % 2 == 1, index < features // 2, index >= features // 2]
    return [patterns[i % 4] for i in range(transforms)]


class ConditionalFlow(nn.Module):
    """A conditional RQS flow p(x | c) on ``features`` dimensions.

    Arguments:
        features: dimension of x (>= 2 for coupling; 1 uses an element-wise spline).
        context: dimension of the condition c (>= 1).
        transforms: number of spline transforms.
        hidden: hidden layer sizes of each transform's hypernetwork (for
            ``"residual-glu"``: the first entry is the width, the count the blocks).
        bins: spline bins K.
        bound: the splines act on [-bound, bound] and are the identity outside;
            features should lie mostly inside.
        coupling: coupling transforms (fast sampling) or fully autoregressive ones.
        hypernet: ``"mlp"`` (fastest) or ``"residual-glu"`` (the paper's).
    """

    def __init__(
        self,
        features: int,
        context: int,
        transforms: int = 4,
        hidden: tuple[int, ...] = (128, 128),
        bins: int = 8,
        bound: float = 5.0,
        coupling: bool = True,
        hypernet: str = "mlp",
    ) -> None:
        super().__init__()
        if hypernet not in HYPERNETS:
            raise ValueError(f"unknown hypernetwork {hypernet!r}; choose one of {HYPERNETS}")
        if hypernet != "mlp" and not coupling:
            raise ValueError("the residual-glu hypernetwork is only available for coupling flows")
        self.features = features
        self.context = context
        self.bins = bins
        self.bound = float(bound)
        self.coupling = coupling and features > 1
        self.hypernet = hypernet
        univariate = partial(MonotonicRQSTransform, bound=self.bound, slope=SPLINE_SLOPE)
        shapes = [(bins,), (bins,), (bins - 1,)]
        layers = []
        if self.coupling:
            for mask in coupling_masks(features, transforms):
                layer = GeneralCouplingTransform(
                    features, context, mask=mask, univariate=univariate, shapes=shapes, hidden_features=hidden
                )
                if hypernet == "residual-glu":
                    n_a = int(mask.sum())
                    layer.hyper = ResidualGLUNet(n_a, context, (features - n_a) * layer.total, hidden[0], len(hidden))
                layers.append(layer)
        else:
            for i in range(transforms):
                order = torch.arange(features) if i % 2 == 0 else torch.arange(features).flip(0)
                layers.append(
                    MaskedAutoregressiveTransform(
                        features, context, order=order, univariate=univariate, shapes=shapes, hidden_features=hidden
                    )
                )
        base = UnconditionalDistribution(DiagNormal, torch.zeros(features), torch.ones(features), buffer=True)
        self.flow = Flow(layers, base)

    def forward(self, context: Tensor) -> Distribution:
        """The distribution p(x | c) as zuko builds it, for context (n, context)."""
        return self.flow(context)

    def log_prob(self, x: Tensor, context: Tensor) -> Tensor:
        """log p(x | c), shape (n,), for x (n, features) and context (n, context).

        Coupling flows run a fused loop over the transforms (:func:`rqs_forward`: zuko's
        maths in fewer tensor operations, differentiable; training spends most of a flow
        stage here); autoregressive ones go through zuko."""
        if not self.coupling:
            return self.flow(context).log_prob(x)
        z, ladj = self._forward(x, context)
        return ladj - 0.5 * (z * z).sum(-1) - 0.5 * self.features * math.log(2 * math.pi)

    def transform(self, x: Tensor, context: Tensor) -> Tensor:
        """Map data points x (n, features) to the base space given context (n, context):
        zuko's ``flow(context).transform(x)``, for coupling flows by the fused loop of
        :meth:`log_prob` (differentiable; an M-flow's encoder)."""
        if not self.coupling:
            return self.flow.transform(context)(x)
        return self._forward(x, context)[0]

    def _forward(self, x: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        """Coupling flows: base-space points z (n, features) and log|det dz/dx| (n,)."""
        z, ladj = x, x.new_zeros(x.shape[0])
        context = context.to(x.dtype)
        for step in self._plan().steps:  # the index tensors the sampler uses, built once
            idx_a, idx_b, undo = (t.to(x.device) for t in step.indices)
            z_a = z.index_select(-1, idx_a)
            params = step.layer.hyper(torch.cat((z_a, context), dim=-1)).reshape(-1, len(idx_b), step.total)
            z_b, step_ladj = rqs_forward(params, z.index_select(-1, idx_b), self.bound)
            z = torch.cat((z_a, z_b), dim=-1).index_select(-1, undo)
            ladj = ladj + step_ladj
        return z, ladj

    def sample(self, context: Tensor) -> Tensor:
        """One sample x ~ p(x | c) per row of context (n, context); shape (n, features).

        Coupling flows use the fused inverse; autoregressive ones go through zuko.
        """
        noise = torch.randn(context.shape[0], self.features, dtype=context.dtype, device=context.device)
        return self.transform_inverse(noise, context)

    def transform_inverse(self, z: Tensor, context: Tensor) -> Tensor:
        """Map base-space points z (n, features) to data space given context (n, context).

        Coupling flows skip zuko's transform objects; small CPU batches without
        autograd run in numpy, whose per-operation overhead is about a third of
        torch's (what batch-1 sampling time consists of). Both give zuko's result.
        """
        if not self.coupling:
            return self.flow.transform(context).inv(z)
        plan = self._plan()
        # A traced graph (ONNX export) must record torch operations, never the numpy path; so must
        # torch.func transforms (the Jacobian of a decoder, models.mflow.gram_log_det), whose
        # tensors have no storage numpy could read.
        if (z.shape[0] <= NUMPY_MAX_BATCH and plan.numpy_ok and z.device.type == "cpu"
                and z.dtype == plan.dtype and not torch.is_grad_enabled() and not torch.jit.is_tracing()
                and not torch._C._functorch.is_functorch_wrapped_tensor(z)):
            x, c = z.numpy(), context.to(z.dtype).numpy()
            for step in reversed(plan.steps):
                x = _numpy_coupling_inverse(step, x, c, self.bound)
            return torch.from_numpy(x)
        x = z
        for step in reversed(plan.steps):
            idx_a, idx_b, undo = (t.to(z.device) for t in step.indices)
            y_a = x.index_select(-1, idx_a)
            params = step.layer.hyper(torch.cat((y_a, context), dim=-1)).reshape(-1, len(idx_b), step.total)
            inverse = rqs_inverse_graph if torch.jit.is_tracing() else rqs_inverse
            x_b = inverse(params, x.index_select(-1, idx_b), self.bound)
            x = torch.cat((y_a, x_b), dim=-1).index_select(-1, undo)
        return x

    def _plan(self) -> _SamplingPlan:
        """What the fused inverse needs per transform, built once: index tensors and numpy
        views of the hypernetwork weights (they share memory, so in-place training
        updates show through). Dropped whenever parameters may move (``_apply``, loading)."""
        plan = self.__dict__.get("_sampling_plan")
        if plan is None:
            plan = _SamplingPlan.build(self.flow.transform.transforms, numpy_ok=self.hypernet == "mlp")
            self.__dict__["_sampling_plan"] = plan
        return plan

    def _apply(self, fn, recurse=True):  # .to(), .double(), .cuda() ...
        self.__dict__.pop("_sampling_plan", None)
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.__dict__.pop("_sampling_plan", None)
        super()._load_from_state_dict(*args, **kwargs)


@dataclass
class _CouplingStep:
    layer: GeneralCouplingTransform
    indices: tuple[Tensor, Tensor, Tensor]  # conditioning half, transformed half, permutation undoing their concat
    numpy_indices: tuple[np.ndarray, ...]
    numpy_weights: list[tuple[np.ndarray, np.ndarray]]
    total: int  # spline parameters per transformed feature


@dataclass
class _SamplingPlan:
    steps: list[_CouplingStep]
    dtype: torch.dtype
    numpy_ok: bool

    @classmethod
    def build(cls, layers: nn.ModuleList, numpy_ok: bool) -> _SamplingPlan:
        steps = []
        for layer in layers:
            indices = _coupling_indices(layer.mask.cpu())
            linears = [m for m in layer.hyper if hasattr(m, "weight")] if numpy_ok else []
            numpy_ok = numpy_ok and all(m.weight.device.type == "cpu" and m.weight.dim() == 2 for m in linears)
            weights = [(m.weight.detach().numpy(), m.bias.detach().numpy()) for m in linears] if numpy_ok else []
            steps.append(_CouplingStep(layer, indices, tuple(t.numpy() for t in indices), weights, layer.total))
        dtype = next(layers.parameters()).dtype
        return cls(steps, dtype, numpy_ok)


def _numpy_coupling_inverse(step: _CouplingStep, y: np.ndarray, context: np.ndarray, bound: float) -> np.ndarray:
    idx_a, idx_b, undo = step.numpy_indices
    y_a = y[:, idx_a]
    h = np.concatenate((y_a, context), axis=-1)
    last = len(step.numpy_weights) - 1
    for j, (w, b) in enumerate(step.numpy_weights):
        h = h @ w.T + b
        if j < last:
            h = np.maximum(h, 0)
    x_b = rqs_inverse_numpy(h.reshape(h.shape[0], -1, step.total), y[:, idx_b], bound)
    return np.concatenate((y_a, x_b), axis=-1)[:, undo]


#: Largest batch sampled through numpy (see :meth:`ConditionalFlow.transform_inverse`).
NUMPY_MAX_BATCH = 32


def _soft_clip_scale(bins: int, slope: float) -> list[float]:
    """zuko bounds unconstrained spline parameters p as p / (1 + |p t|), with
    t = 2 / log(slope) for widths and heights, 1 / log(slope) for derivatives."""
    log_slope = math.log(slope)
    return [2 / log_slope] * (2 * bins) + [1 / log_slope] * (bins - 1)


@cache
def _soft_clip_scale_numpy(bins: int, slope: float, dtype: np.dtype) -> np.ndarray:
    return np.asarray(_soft_clip_scale(bins, slope), dtype=dtype)


def _coupling_indices(mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The conditioning half, the transformed half and the permutation undoing their concat."""
    idx_a, idx_b = mask.nonzero().squeeze(-1), (~mask).nonzero().squeeze(-1)
    return idx_a, idx_b, torch.cat((idx_a, idx_b)).argsort()


def _rqs_bin(params: Tensor, v: Tensor, row: int, bound: float, slope: float) -> tuple[Tensor, ...]:
    """The bin of zuko's monotonic RQS with unconstrained parameters (n, f, 3K - 1) that holds
    v (n, f) on the x knots (``row`` 0: the forward map) or the y knots (1: the inverse):
    (x0, x1, y0, y1, d0, d1) (n, f) each and whether v lies inside [-bound, bound].

    Only what the solve reads is formed: the widths' and heights' cumulative sums are compared
    with v on the unnormalised scale (c_j < (v + B) / 2B * total), only the bin's two knots are
    normalised, and only its two knot slopes are clipped and exponentiated (ends 1). Training
    and large batches spend their flow time on element-wise passes over n x f x 3K values, so
    fewer of them is what makes it fast (docs/caloman-model.md, Speed design)."""
    features, size = int(params.shape[1]), int(params.shape[2])
    bins = (size + 1) // 3
    scale = 2 / math.log(slope)  # zuko's soft clip p / (1 + |p t|) of widths and heights; t / 2 for slopes
    sizes = params[..., :2 * bins]
    weights = (sizes / (1 + (sizes * scale).abs())).exp().reshape(-1, features, 2, bins)  # clipped: |p| < 3.5
    cumulative = weights.cumsum(-1)
    total = cumulative[..., -1]  # (n, f, 2)
    unit = (v + bound) * (0.5 / bound)  # v as a fraction of [-bound, bound]
    k = (cumulative[:, :, row, :bins - 1] < (unit * total[..., row]).unsqueeze(-1)).sum(-1, keepdim=True)
    edges = torch.cat((k - 1, k), dim=-1)  # the bin's lower and upper knot less one (knot 0 has sum 0)
    picked = cumulative.gather(-1, edges.clamp_min(0).unsqueeze(-2).expand(-1, -1, 2, 2))  # (n, f, 2, 2)
    picked = picked.masked_fill((edges < 0).unsqueeze(-2), 0.0)
    knots = picked / total.unsqueeze(-1) * (2 * bound) - bound  # [[x0, x1], [y0, y1]]
    x0, x1, y0, y1 = knots.reshape(-1, features, 4).unbind(-1)
    inner = params[..., 2 * bins:].gather(-1, edges.clamp(0, bins - 2))  # slopes of knots k and k + 1
    slopes = (inner / (1 + (inner * (scale / 2)).abs())).exp()
    ends = torch.cat((k == 0, k == bins - 1), dim=-1)
    d0, d1 = slopes.masked_fill(ends, 1.0).unbind(-1)
    return x0, x1, y0, y1, d0, d1, (v > -bound) & (v < bound)


def rqs_forward(params: Tensor, x: Tensor, bound: float, slope: float = SPLINE_SLOPE) -> tuple[Tensor, Tensor]:
    """zuko's monotonic RQS (``MonotonicRQSTransform.call_and_ladj``) with unconstrained
    parameters (n, f, 3K - 1) at x (n, f): y (n, f) and the log-determinant of the Jacobian
    summed over the features (n,). Identity (log-det 0) outside [-bound, bound]. The same
    maths as zuko in fewer operations (:func:`_rqs_bin`); agrees with it to float rounding (tested)."""
    x0, x1, y0, y1, d0, d1, inside = _rqs_bin(params, x, 0, bound, slope)
    width, height = x1 - x0, y1 - y0
    s = height / width
    t = ((x - x0) / width).where(inside, torch.zeros_like(x))
    tt = t * (1 - t)
    denominator = s + (d0 + d1 - 2 * s) * tt
    y = y0 + height * (s * t * t + d0 * tt) / denominator
    jacobian = s * s * (2 * s * tt + d0 * (1 - t) ** 2 + d1 * t * t) / (denominator * denominator)
    ladj = torch.where(inside, jacobian.log(), torch.zeros_like(jacobian)).sum(-1)
    return torch.where(inside, y, x), ladj


def rqs_inverse(params: Tensor, y: Tensor, bound: float, slope: float = SPLINE_SLOPE) -> Tensor:
    """Inverse of zuko's monotonic RQS with unconstrained parameters
    params (n, f, 3K - 1) = [widths K, heights K, derivatives K - 1] at y (n, f).
    Identity outside [-bound, bound]."""
    x0, x1, y0, y1, d0, d1, inside = _rqs_bin(params, y, 1, bound, slope)
    return _rqs_solve(x0, x1, y0, y1, d0, d1, y, inside, torch.where)


@cache
def _knot_matrix(bins: int) -> tuple[np.ndarray, np.ndarray]:
    """M (3K - 1, 3 (K + 2)) and offset (3 (K + 2),) such that exp(params) @ M + offset, read as
    three rows of K + 2, holds per row [K + 1 values, their normaliser]: cumulative widths and
    their total, cumulative heights and their total, [1, K - 1 derivatives, 1] and 1."""
    size, row = 3 * bins - 1, bins + 2
    matrix, offset = np.zeros((size, 3 * row)), np.zeros(3 * row)
    for block in range(2):  # widths, heights: cumulative sums 0, e_0, e_0 + e_1, ... and the total
        for i in range(bins):
            matrix[block * bins + i, block * row + i + 1:block * row + bins + 1] = 1.0
            matrix[block * bins + i, block * row + bins + 1] = 1.0
    for i in range(bins - 1):  # inner derivatives; the two ends and the normaliser are 1
        matrix[2 * bins + i, 2 * row + i + 1] = 1.0
    offset[[2 * row, 2 * row + bins, 2 * row + bins + 1]] = 1.0
    return matrix, offset


def rqs_inverse_graph(params: Tensor, y: Tensor, bound: float, slope: float = SPLINE_SLOPE) -> Tensor:
    """:func:`rqs_inverse` in fewer operations, for traced graphs (ONNX export), whose time at
    batch 1 is per-operation overhead: the knot table (x knots, y knots, slopes) comes from one
    matrix product of the exponentiated parameters, the bin from the inner y knots, and the
    quadratic is solved in a form with fewer negations. The same maths; agrees with
    :func:`rqs_inverse` to float32 rounding (tested). Identity outside [-bound, bound]."""
    features, size = int(params.shape[1]), int(params.shape[2])
    bins = (size + 1) // 3
    params = params / (1 + (params * params.new_tensor(_soft_clip_scale(bins, slope))).abs())
    matrix, offset = (params.new_tensor(a) for a in _knot_matrix(bins))
    table = (params.exp() @ matrix + offset).reshape(-1, features, 3, bins + 2)
    scale = params.new_tensor([[2 * bound], [2 * bound], [1.0]])  # knots: fraction * 2B - B; slopes as they are
    shift = params.new_tensor([[-bound], [-bound], [0.0]])
    table = table[..., :bins + 1] / table[..., bins + 1:] * scale + shift  # (n, f, 3, K + 1)
    y = y.unsqueeze(-1)  # (n, f, 1)
    k = (table[:, :, 1:2, 1:bins] < y.unsqueeze(-1)).sum(-1, keepdim=True)  # bin of y, (n, f, 1, 1)
    index = (k + torch.arange(2, device=k.device)).expand(-1, -1, 3, -1)  # (n, f, 3, 2): bins k and k + 1
    x0, x1, y0, y1, d0, d1 = table.gather(-1, index).reshape(-1, features, 6).split(1, dim=-1)
    height, width = y1 - y0, x1 - x0
    s = height / width
    dy = y - y0
    curved = dy * (d0 + d1 - 2 * s)
    a = height * (s - d0) + curved
    b = height * d0 - curved
    c = s * dy  # minus zuko's c: z = 2 c / (b + sqrt(b^2 + 4 a c))
    z = 2 * c / (b + (b * b + 4 * a * c).sqrt())
    return torch.where(y.abs() < bound, x0 + z * width, y).reshape(-1, features)


def rqs_inverse_numpy(params: np.ndarray, y: np.ndarray, bound: float, slope: float = SPLINE_SLOPE) -> np.ndarray:
    """:func:`rqs_inverse` in numpy, for small batches."""
    n, f, size = params.shape
    bins = (size + 1) // 3
    params = params / (1 + np.abs(params * _soft_clip_scale_numpy(bins, slope, params.dtype)))
    cumulative = np.exp(params[..., :2 * bins].reshape(n, f, 2, bins)).cumsum(-1)
    table = np.empty((n, f, 3, bins + 1), dtype=params.dtype)
    table[..., :2, 0] = -bound
    table[..., :2, 1:] = cumulative / cumulative[..., -1:] * (2 * bound) - bound
    table[..., 2, 0] = table[..., 2, -1] = 1
    table[..., 2, 1:-1] = np.exp(params[..., 2 * bins:])

    k = (table[..., 1, :] < y[..., None]).sum(-1) - 1
    inside = (k >= 0) & (k < bins)
    k = np.minimum(np.maximum(k, 0), bins - 1).reshape(-1, 1)
    flat = table.reshape(n * f, 3 * (bins + 1))
    rows = np.arange(n * f)[:, None]
    offsets = np.arange(3) * (bins + 1)
    lower, upper = flat[rows, offsets + k].reshape(n, f, 3), flat[rows, offsets + k + 1].reshape(n, f, 3)
    return _rqs_solve(lower[..., 0], upper[..., 0], lower[..., 1], upper[..., 1], lower[..., 2], upper[..., 2],
                      y, inside, np.where)


def _rqs_solve(x0, x1, y0, y1, d0, d1, y, inside, where):
    """Solve the rational-quadratic bin (x0, x1) -> (y0, y1) with end slopes d0, d1
    for x at y (Durkan et al. 2019, appendix A.3; zuko's formula); identity outside."""
    height = y1 - y0
    s = height / (x1 - x0)
    dy = inside * (y - y0)
    curvature = d0 + d1 - 2 * s
    a = height * (s - d0) + dy * curvature
    b = height * d0 - dy * curvature
    c = -s * dy
    z = 2 * c / (-b - (b * b - 4 * a * c) ** 0.5)
    return where(inside, x0 + z * (x1 - x0), y)
