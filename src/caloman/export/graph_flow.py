"""A coupling flow's sampling map re-expressed for an ONNX graph in few operators.

:meth:`caloman.models.flows.ConditionalFlow.transform_inverse` traced as it is costs about
61 ONNX Runtime operators per transform (index selects, concatenations, the spline's knot
table, the bin search, the solve); at batch 1 a graph's time is mostly per-operator
overhead, so :class:`GraphCouplingFlow` computes the same map in about 40. It works on one
*state* (n, F + C) = [features, condition] that every transform reads whole and writes
back in place, with the trained weights rearranged once, in float64, at construction:

* the hypernetwork's first layer reads the state directly (its weights scattered to the
  state's columns; the condition columns may hold any linear image of the condition,
  ``context_from_state``), so no select or concatenation feeds it;
* its last layer's rows carry zuko's soft-clip scale (p / (1 + |p t|) = softsign(p t) / t)
  plus one zero row per feature whose exponential is the constant 1;
* the per-bin table [x0, width, y0, height, d0, d0 + d1] of every bin, and a constant
  column far below any input, is one ratio of two matrix products of the exponentiated
  parameters; the bin index, already offset for each of the six quantities, is one integer
  matrix product of the comparisons with y, and one gather reads the bin;
* the quadratic of Durkan et al. (2019, appendix A.3) is solved for the position in the bin
  in the variable r = (y - y0) / h, in 18 operators;
* the result is written back with a 0/1 placement product and a select, which leave the
  untouched columns bit for bit.

The same maths as the flow's sampler, in another order of float32 rounding: it agrees with
``transform_inverse`` to rounding (tested). Only coupling flows with zuko MLP hypernetworks
(ReLU) are rearranged; :func:`supports` says whether a flow is one.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from caloman.models.flows import SPLINE_SLOPE, ConditionalFlow, _soft_clip_scale

#: A table entry below every input: the comparison with it is always true and carries the offsets.
_FLOOR = -3.0e38
#: The six per-bin quantities of the table, in its column order.
_QUANTITIES = ("x0", "width", "y0", "height", "d0", "d0_plus_d1")


class _Softsign(torch.autograd.Function):
    """x / (1 + |x|), recorded as ONNX's one ``Softsign`` operator (torch records three)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: ARG004 (no backward: sampling only)
        return nn.functional.softsign(x)

    @staticmethod
    def symbolic(g, x):  # the TorchScript-based exporter's hook
        return g.op("Softsign", x)


def supports(flow: ConditionalFlow) -> bool:
    """Whether :class:`GraphCouplingFlow` can express ``flow``: coupling transforms whose
    hypernetworks are plain linear / ReLU stacks (zuko's MLP, the ``"mlp"`` hypernet)."""
    if not flow.coupling or flow.hypernet != "mlp":
        return False
    for step in flow._plan().steps:
        layers = list(step.layer.hyper)
        linear = [_is_linear(m) for m in layers]
        # Linear, ReLU, Linear, ..., Linear: alternating, starting and ending with a linear layer.
        if len(layers) % 2 == 0 or linear != [i % 2 == 0 for i in range(len(layers))]:
            return False
        if not all(isinstance(m, nn.ReLU) for m in layers[1::2]):
            return False
    return True


def _is_linear(module: nn.Module) -> bool:
    """A linear layer with a 2-D weight and a bias (torch's or zuko's ``Linear``)."""
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    return isinstance(weight, Tensor) and weight.dim() == 2 and isinstance(bias, Tensor)


def spline_table_matrices(bins: int, bound: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Numerator and denominator (3K, 6K + 1) and the offset selector (6K + 1, 6), float64.

    Rows: the exponentiated spline parameters of one feature, [K widths, K heights, K - 1
    derivatives, 1 (a constant)]. Column 6 j + ... : quantity j of :data:`_QUANTITIES` for
    bin k at column j K + k (x0 = -B + 2B (widths below k) / total, ...), then the floor.
    ``(table < y) @ selector`` gives, per quantity j, j K + (number of inner y knots below y)."""
    k_bins, size = bins, 3 * bins
    const = size - 1
    widths, heights, derivatives = np.arange(k_bins), k_bins + np.arange(k_bins), 2 * k_bins + np.arange(k_bins - 1)
    numerator, denominator = np.zeros((size, 6 * k_bins + 1)), np.zeros((size, 6 * k_bins + 1))
    for k in range(k_bins):
        for rows, start in ((widths, 0), (heights, 2)):
            col = (start + 0) * k_bins + k  # x0 or y0: -B + 2B (sum below k) / total
            numerator[rows, col] = -bound
            numerator[rows[:k], col] = bound
            denominator[rows, col] = 1.0
            col = (start + 1) * k_bins + k  # width or height: 2B e_k / total
            numerator[rows[k], col] = 2 * bound
            denominator[rows, col] = 1.0
        d0 = const if k == 0 else derivatives[k - 1]
        d1 = const if k == k_bins - 1 else derivatives[k]
        numerator[d0, 4 * k_bins + k] = 1.0
        numerator[d0, 5 * k_bins + k] += 1.0
        numerator[d1, 5 * k_bins + k] += 1.0
        denominator[const, 4 * k_bins + k] = denominator[const, 5 * k_bins + k] = 1.0
    numerator[const, 6 * k_bins] = _FLOOR
    denominator[const, 6 * k_bins] = 1.0
    selector = np.zeros((6 * k_bins + 1, 6), dtype=np.int64)
    selector[2 * k_bins + 1:3 * k_bins, :] = 1  # inner y knots y0_1 ... y0_{K-1}
    selector[6 * k_bins, :] = np.arange(6) * k_bins
    return numerator, denominator, selector


class GraphCouplingStep(nn.Module):
    """One coupling transform's inverse on the state (n, W); see the module docstring.

    Arguments:
        step: the flow's sampling-plan entry (hypernetwork, conditioning / transformed indices).
        features: F; width: W = F + C state columns; bins, bound: the spline's.
        context_from_state: (C, c) matrix, the condition the hypernetwork was trained on
            as a function of the state's last C columns.
    """

    def __init__(self, step, features: int, width: int, bins: int, bound: float, context_from_state: Tensor) -> None:
        super().__init__()
        idx_a, idx_b, _ = (t.cpu() for t in step.indices)
        linears = [m for m in step.layer.hyper if _is_linear(m)]
        n_a, n_b, size = len(idx_a), len(idx_b), 3 * bins
        first = linears[0].weight.detach().double()  # (H, n_a + c)
        w1 = torch.zeros(first.shape[0], width, dtype=torch.float64)
        w1[:, idx_a] = first[:, :n_a]
        w1[:, features:] = first[:, n_a:] @ context_from_state.double().t()
        last = linears[-1].weight.detach().double().reshape(n_b, size - 1, -1)
        last_bias = linears[-1].bias.detach().double().reshape(n_b, size - 1)
        scale = torch.tensor(_soft_clip_scale(bins, SPLINE_SLOPE), dtype=torch.float64)
        w3 = torch.zeros(n_b, size, last.shape[-1], dtype=torch.float64)
        b3 = torch.zeros(n_b, size, dtype=torch.float64)
        w3[:, :-1] = last * scale[:, None]
        b3[:, :-1] = last_bias * scale
        weights = [w1, *(m.weight.detach().double() for m in linears[1:-1]), w3.reshape(n_b * size, -1)]
        biases = [linears[0].bias.detach().double(), *(m.bias.detach().double() for m in linears[1:-1]),
                  b3.reshape(-1)]
        dtype = linears[0].weight.dtype
        self.hyper = nn.ModuleList(nn.Linear(w.shape[1], w.shape[0], dtype=dtype) for w in weights)
        for layer, w, b in zip(self.hyper, weights, biases):
            layer.weight.data.copy_(w)
            layer.bias.data.copy_(b)
            layer.requires_grad_(False)
        numerator, denominator, selector = spline_table_matrices(bins, bound)
        unclip = torch.ones(size, dtype=torch.float64)
        unclip[:-1] = 1.0 / scale
        placement = torch.zeros(n_b, width, dtype=dtype)
        placement[torch.arange(n_b), idx_b] = 1.0
        mask = torch.zeros(width, dtype=torch.bool)
        mask[idx_b] = True
        for name, value in (("index_b", idx_b.reshape(-1, 1)), ("unclip", unclip.to(dtype)),
                            ("numerator", torch.as_tensor(numerator, dtype=dtype)),
                            ("denominator", torch.as_tensor(denominator, dtype=dtype)),
                            ("selector", torch.as_tensor(selector)), ("placement", placement), ("mask", mask)):
            self.register_buffer(name, value, persistent=False)
        self.n_b, self.size, self.bound = n_b, size, float(bound)

    def forward(self, state: Tensor) -> Tensor:
        """state (n, W) -> state (n, W) with the transformed columns inverted."""
        h = state
        for i, layer in enumerate(self.hyper):
            h = layer(h)
            if i < len(self.hyper) - 1:
                h = torch.relu(h)
        exp_params = (_Softsign.apply(h.reshape(-1, self.n_b, self.size)) * self.unclip).exp()
        table = (exp_params @ self.numerator) / (exp_params @ self.denominator)  # (n, n_b, 6K + 1)
        y = state[:, self.index_b]  # (n, n_b, 1)
        index = (table < y).long() @ self.selector  # (n, n_b, 6): bin k of each quantity
        x0, width, y0, height, d0, d0_plus_d1 = table.gather(-1, index).split(1, dim=-1)
        # With r = (y - y0) / h in [0, 1] the bin's position z solves (s - b) z^2 + b z - r s = 0,
        # b = d0 - r (d0 + d1 - 2 s), s = h / w (Durkan et al. 2019, eq. 29 divided by h).
        s = height / width
        r = (y - y0) / height
        s2 = s + s
        b = d0 - r * (d0_plus_d1 - s2)
        rs2 = r * s2  # 2 r s
        ars4 = (s - b) * rs2
        z = rs2 / (b + (b * b + ars4 + ars4).sqrt())
        x = torch.where(y.abs() < self.bound, x0 + z * width, y).reshape(-1, self.n_b)
        return torch.where(self.mask, x @ self.placement, state)


class GraphCouplingFlow(nn.Module):
    """:meth:`ConditionalFlow.transform_inverse` on a state (n, F + C) = [base noise, condition
    columns] -> (n, F + C) = [samples, the same condition columns].

    Arguments:
        flow: a flow :func:`supports` accepts.
        context_from_state: (C, c) matrix with condition = state[:, F:] @ it (default identity,
            C = c).
    """

    def __init__(self, flow: ConditionalFlow, context_from_state: Tensor | None = None) -> None:
        super().__init__()
        if not supports(flow):
            raise ValueError("GraphCouplingFlow needs a coupling flow with MLP hypernetworks")
        if context_from_state is None:
            context_from_state = torch.eye(flow.context, dtype=torch.float64)
        width = flow.features + context_from_state.shape[0]
        self.features = flow.features
        self.steps = nn.ModuleList(
            GraphCouplingStep(step, flow.features, width, flow.bins, flow.bound, context_from_state)
            for step in reversed(flow._plan().steps))

    def forward(self, state: Tensor) -> Tensor:
        for step in self.steps:
            state = step(state)
        return state


__all__ = ["GraphCouplingFlow", "GraphCouplingStep", "spline_table_matrices", "supports"]
