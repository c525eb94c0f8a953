import math

import numpy as np
import pytest
import torch

from caloman.components import ComponentsConfig, count_components, energy_groups, graph_components
from caloman.errors import ConfigError
from caloman.implicit import Union

torch.set_num_threads(1)

CENTRES = (-1.8, 1.8)


def circle(centre: float):
    def F(x):
        return 0.5 * ((x - torch.tensor([centre, 0.0])).square().sum(-1, keepdim=True) - 1.0)
    return F


def on_circles(centres, n, seed=0):
    rng = np.random.default_rng(seed)
    angle = rng.uniform(0, 2 * math.pi, n)
    which = rng.integers(len(centres), size=n)
    points = np.stack([np.cos(angle) + np.asarray(centres)[which], np.sin(angle)], 1)
    return torch.as_tensor(points, dtype=torch.float32)


BOX = (torch.tensor([-3.5, -2.0]), torch.tensor([3.5, 2.0]))
SMALL = ComponentsConfig(dims=2, samples=400, spread_steps=5)


@pytest.mark.parametrize("centres, expected", [(CENTRES, 2), ((-1.8,), 1)])
def test_counts_the_components_of_known_zero_sets(centres, expected):
    F = circle(centres[0]) if len(centres) == 1 else Union(circle(centres[0]), circle(centres[1]))
    count = count_components(F, on_circles(centres, 300), BOX, SMALL, torch.Generator().manual_seed(0))
    assert count.components == expected, count
    assert count.mean_residual < 1e-4 and count.dropped == 0
    assert sum(count.sizes) == count.samples == SMALL.samples


def test_graph_scale_rule_splits_gaps_and_drops_fragments():
    rng = np.random.default_rng(0)
    line = np.stack([np.linspace(0, 1, 200), np.zeros(200)], 1)
    points = np.concatenate([line, line + [3.0, 0.0], [[10.0, 10.0], [10.01, 10.0]]])
    counted, sizes, fragments, radius = graph_components(points + 1e-4 * rng.normal(size=points.shape), 5, 3.0,
                                                         0.02)
    assert (counted, fragments) == (2, 1) and sizes[:2] == [200, 200] and radius < 0.1


def test_energy_groups_and_bad_settings():
    groups = energy_groups(np.array([1.0, 2.0, 1.0, 4.0]), 30)
    assert [(e, list(i)) for e, i in groups] == [(1.0, [0, 2]), (2.0, [1]), (4.0, [3])]
    binned = energy_groups(np.exp(np.linspace(0, 5, 100)), 4)
    assert len(binned) == 4 and sum(len(i) for _, i in binned) == 100
    with pytest.raises(ConfigError):
        ComponentsConfig(dims=3, codimension=3)
    with pytest.raises(ConfigError):
        ComponentsConfig(scale=0)
