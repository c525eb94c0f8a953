"""Union and intersection of zero sets (EBIM, sec. 3.3).

- Union: {F1 = 0} u {F2 = 0} is the zero set of F1 * F2 (elementwise) when both
  have the same codimension 1; in general of ||F1|| ||F2|| (codimension 1 output,
  a level set that is not regular where a component has codimension > 1, so
  constrained sampling on it needs codimension 1 components).
- Intersection: {F1 = 0} n {F2 = 0} is the zero set of (F1, F2) stacked,
  codimension c1 + c2.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

ImplicitFunction = Callable[[Tensor], Tensor]


class Union(nn.Module):
    """F(x) = F1(x) * F2(x) for codimension 1 parts, ||F1(x)|| ||F2(x)|| otherwise; (b, n) -> (b, 1)."""

    def __init__(self, first: ImplicitFunction, second: ImplicitFunction) -> None:
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.first(x), self.second(x)
        if a.shape[-1] == 1 and b.shape[-1] == 1:
            return a * b
        return (torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)).unsqueeze(-1)


class Intersection(nn.Module):
    """F(x) = (F1(x), F2(x)); (b, n) -> (b, c1 + c2)."""

    def __init__(self, first: ImplicitFunction, second: ImplicitFunction) -> None:
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat((self.first(x), self.second(x)), dim=-1)
