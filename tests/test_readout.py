"""The readout threshold that keeps each layer's energy (caloman.models.readout)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caloman.models.readout import LayerLayout, threshold_keeping_layer_energies

SIZES = [3, 6, 2]


def _brute_force(voxels: np.ndarray, energy: float, threshold: float) -> np.ndarray:
    """One layer by the definition: the largest m whose top-m voxels, scaled to carry the
    energy, are all >= threshold; those scaled, the rest zero."""
    order = np.argsort(-voxels, kind="stable")
    out = np.zeros_like(voxels)
    for m in range(len(voxels), 0, -1):
        top = voxels[order[:m]]
        if top.min() > 0 and energy * top.min() / top.sum() >= threshold:
            out[order[:m]] = top * energy / top.sum()
            return out
    return out


def _random_case(seed: int, n: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    showers = rng.gamma(0.5, 2.0, size=(n, sum(SIZES))) * (rng.random((n, sum(SIZES))) < 0.7)
    energies = rng.uniform(0.2, 12.0, size=(n, len(SIZES)))
    return torch.as_tensor(showers), torch.as_tensor(energies)


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_the_definition_layer_by_layer(seed):
    showers, energies = _random_case(seed)
    out = threshold_keeping_layer_energies(showers, energies, LayerLayout(SIZES), 1.0, steps=50).numpy()
    starts = np.cumsum([0] + SIZES)
    for i in range(len(showers)):
        for layer, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
            want = _brute_force(showers[i, a:b].numpy(), float(energies[i, layer]), 1.0)
            np.testing.assert_allclose(out[i, a:b], want, rtol=1e-10, atol=1e-12)


def test_each_layer_holds_its_energy_and_every_voxel_is_zero_or_above_threshold():
    showers, energies = _random_case(2, n=500)
    out = threshold_keeping_layer_energies(showers, energies, LayerLayout(SIZES), 1.0)
    assert not ((out > 0) & (out < 1.0 - 1e-12)).any()
    starts = np.cumsum([0] + SIZES)
    sums = torch.stack([out[:, a:b].sum(1) for a, b in zip(starts[:-1], starts[1:])], dim=1)
    has_voxels = torch.stack([(showers[:, a:b] > 0).any(1) for a, b in zip(starts[:-1], starts[1:])], dim=1)
    should_hold = (energies >= 1.0) & has_voxels
    torch.testing.assert_close(sums[should_hold], energies[should_hold])
    # below the threshold a layer cannot light a voxel: it is empty, as in data
    assert (sums[energies < 1.0] == 0).all()


def test_smallest_lit_voxels_reach_down_to_the_threshold():
    """The tell this readout removes: thresholding first and then multiplying a layer back
    to its energy leaves no voxel between T and T x (its factor)."""
    rng = np.random.default_rng(3)
    n, width = 4000, 20
    showers = torch.as_tensor(rng.gamma(0.6, 2.5, (n, width)) * (rng.random((n, width)) < 0.5))
    energies = showers.sum(1, keepdim=True)  # the layer's energy before any threshold: some is lost below it
    new = threshold_keeping_layer_energies(showers, energies, LayerLayout([width]), 1.0)
    cut = showers * (showers >= 1.0)
    old = cut * (energies / cut.sum(1, keepdim=True).clamp_min(1e-30))
    lowest_new = torch.where(new > 0, new, torch.inf).min(1).values
    lowest_old = torch.where(old > 0, old, torch.inf).min(1).values
    near, near_old = (lowest_new < 1.05).double().mean(), (lowest_old < 1.05).double().mean()
    assert near > 2 * near_old and near > 0.05


def test_traceable_and_dtype_preserving():
    showers, energies = _random_case(4, n=8)
    layout = LayerLayout(SIZES)
    fn = lambda s, e: threshold_keeping_layer_energies(s, e, layout, 1.0)  # noqa: E731
    traced = torch.jit.trace(fn, (showers.float(), energies.float()))
    other, other_energies = _random_case(5, n=8)
    torch.testing.assert_close(traced(other.float(), other_energies.float()), fn(other.float(), other_energies.float()))
    assert fn(showers.float(), energies.float()).dtype == torch.float32



def test_layer_sums_agree_across_the_small_and_large_batch_paths():
    """Below SLICE_SUMS_FROM showers the sums are one matrix product, from there slice sums."""
    from caloman.models.readout import SLICE_SUMS_FROM

    layout = LayerLayout(SIZES)
    showers, _ = _random_case(6, n=2 * SLICE_SUMS_FROM)
    want = torch.stack([part.sum(1) for part in showers.split(SIZES, dim=1)], dim=1)
    torch.testing.assert_close(layout.sums(showers), want)  # slices
    torch.testing.assert_close(layout.sums(showers[:3]), want[:3])  # one-hot product
    spread = layout.spread(want)
    assert spread.shape == showers.shape
    torch.testing.assert_close(spread[:, :SIZES[0]], want[:, :1].expand(-1, SIZES[0]))
