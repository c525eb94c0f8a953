"""Truth vs method: 2-D histograms on the metric grid, in the package's mplhep style."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from caloman.plots import _figure, _save
from caloman.toy.metrics import histogram


def plot_toy(path: str | Path, truth: np.ndarray, samples: np.ndarray, weights: np.ndarray | None,
             hist_range, *, method: str, dataset: str) -> Path:
    """Two panels (truth, method; weighted when the method gives weights) with a shared colour scale."""
    h_truth, xe, ye = histogram(truth, None, hist_range, density=True)
    h_method = histogram(samples, weights, hist_range, density=True)[0]
    vmax = max(h_truth.max(), h_method.max())
    aspect = (hist_range[1][1] - hist_range[1][0]) / (hist_range[0][1] - hist_range[0][0])
    with _figure(9.0, 0.5 + 4.2 * aspect + 0.6) as fig:
        axes = fig.subplots(1, 2, sharey=True)
        label = f"{method}{' (weighted)' if weights is not None else ''}"
        for ax, h, title in zip(axes, (h_truth, h_method), ("truth", label)):
            mesh = ax.pcolormesh(xe, ye, h.T, vmin=0, vmax=vmax, cmap="viridis", rasterized=True)
            ax.set_title(f"{dataset}: {title}")
            ax.set_xlabel("$x_1$")
            ax.set_aspect("equal")
        axes[0].set_ylabel("$x_2$")
        fig.colorbar(mesh, ax=axes, label="density", shrink=0.8)
        return _save(fig, Path(path))


def plot_manifold_toy(path: str | Path, truth: np.ndarray, samples: np.ndarray, zero_set: np.ndarray | None,
                      *, method: str, dataset: str, points: int = 3000) -> Path:
    """Truth and method samples (first ``points`` of each) over the learned zero set (grey), 2-D or 3-D."""
    dimension = truth.shape[1]
    with _figure(9.0, 4.6) as fig:
        for i, (x, title) in enumerate(((truth, "truth"), (samples, method))):
            ax = fig.add_subplot(1, 2, i + 1, **({"projection": "3d"} if dimension == 3 else {}))
            coords = [x[:points, k] for k in range(dimension)]
            if zero_set is not None and i == 1:
                ax.scatter(*[zero_set[:, k] for k in range(dimension)], s=1, c="0.6", alpha=0.5,
                           label="learned manifold", rasterized=True)
            ax.scatter(*coords, s=2, alpha=0.4, rasterized=True, label="samples")
            ax.set_title(f"{dataset}: {title}")
            ax.set_xlabel("$x_1$")
            ax.set_ylabel("$x_2$")
            if dimension == 3:
                ax.set_zlabel("$x_3$")
            else:
                ax.set_aspect("equal")
            if zero_set is not None and i == 1:
                ax.legend(loc="upper right", markerscale=5)
        return _save(fig, Path(path))
