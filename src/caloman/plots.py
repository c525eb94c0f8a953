"""The pictures physicists expect from a calorimeter shower generator.

Average showers per layer drawn in polar (r, alpha) coordinates with a log
colour scale (as the CaloChallenge draws them), average showers per incident
energy, high-level feature histograms (reference filled, generated as a line,
separation power in the legend), classifier ROC curves, intrinsic-dimension
curves and training histories.

Plots consume results computed elsewhere (:mod:`caloman.metrics`, the
trainers); the only arithmetic here is averaging showers. Every function
writes one PNG (or a few) atomically through :func:`caloman.io.atomic_path`,
so a failed plot never leaves a half-written file, and returns the path(s).
Figures are built on the Agg canvas without pyplot, and the mplhep CMS style
is applied only inside each call, so importing this module changes no global
matplotlib state.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import matplotlib as mpl
import mplhep
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter
from PIL import Image

from caloman.errors import InvalidEnergyError, VoxelCountError
from caloman.geometry import Binning
from caloman.io import atomic_path
from caloman.metrics import ClassifierResult, FeatureHistogram

__all__ = [
    "plot_average_shower",
    "plot_average_shower_comparison",
    "plot_average_showers_per_energy",
    "energy_groups",
    "plot_dimension_curve",
    "plot_feature_histograms",
    "plot_roc",
    "plot_training_history",
]

#: Resolution of saved figures; with the figure sizes below PNGs stay well under 1 MB.
DPI = 110
#: Resolution of the polar-panel figures, whose dataset-3 grids hold 2 x 45 x 900 voxels.
POLAR_DPI = 100
#: Polar panels per grid row for the 45-layer datasets 2 and 3.
GRID_COLUMNS = 9
#: At most this many layers per row in the per-energy figure (datasets 2/3 show a spread of layers).
MAX_LAYERS_PER_ENERGY_ROW = 9
#: Feature-histogram panels per figure in a near-square layout (dataset 1's families all fit).
MAX_PANELS_PER_FIGURE = 16
#: A family with more panels (45 layers) is one grid of ``GRID_COLUMNS`` columns, up to this many panels.
MAX_PANELS_PER_GRID = 54
#: Decades of mean voxel energy spanned by the log colour scale below its maximum.
COLOUR_DECADES = 6
#: Angular resolution of the polar meshes: alpha bins are split so a full turn has at least this many steps,
#: otherwise pcolormesh would draw straight chords instead of arcs (and a one-bin layer would be a point).
_MIN_ANGULAR_STEPS = 120

_CMAP = "viridis"
_REFERENCE_COLOUR = "#5790fc"
_GENERATED_COLOUR = "#e42536"
_CLASSIFIER_NAMES = {"low": "low-level", "low_normed": "low-level normed", "high": "high-level"}


# -- style ------------------------------------------------------------------
@lru_cache(maxsize=1)
def _style() -> dict:
    """mplhep's CMS style, scaled down for multi-panel figures and with fonts that exist here."""
    style = dict(mplhep.style.CMS)
    installed = {f.name for f in mpl.font_manager.fontManager.ttflist}
    if "TeX Gyre Heros" not in installed:
        # Without the CMS font, fall back quietly instead of logging a findfont warning per text.
        style.update({"font.sans-serif": ["DejaVu Sans"], "mathtext.fontset": "dejavusans"})
        for key in ("mathtext.rm", "mathtext.bf", "mathtext.sf", "mathtext.it", "mathtext.tt", "mathtext.cal"):
            style.pop(key, None)
    style.update({
        "font.size": 11,
        "axes.linewidth": 1.0,
        "xtick.major.size": 5, "xtick.minor.size": 2.5,
        "ytick.major.size": 5, "ytick.minor.size": 2.5,
        "legend.fontsize": "small",
        "axes.titlesize": "medium",
        "savefig.dpi": DPI,
        "figure.dpi": DPI,
    })
    return style


@contextmanager
def _figure(width: float, height: float, *, layout: str | None = "constrained") -> Iterator[Figure]:
    """A figure on the Agg canvas under the package style; closed (cleared) on exit."""
    with mpl.rc_context(_style()):
        fig = Figure(figsize=(width, height), dpi=DPI, layout=layout)
        FigureCanvasAgg(fig)
        try:
            yield fig
        finally:
            fig.clear()


def _save(fig: Figure, path: Path, *, dpi: int = DPI, palette: bool = False) -> Path:
    """Write the figure as PNG to ``path`` atomically and return the path.

    ``palette=True`` stores 256 indexed colours instead of RGBA: the polar grids of datasets 2/3
    are mostly colour-mapped voxels (viridis has 256 colours anyway), and this keeps them under 1 MB.
    """
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        if palette:
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=dpi, facecolor="white")
            buffer.seek(0)
            with Image.open(buffer) as image:
                indexed = image.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE)
            indexed.save(tmp, format="png", optimize=True)
        else:
            fig.savefig(tmp, format="png", dpi=dpi, facecolor="white")
    return path


# -- input checks -----------------------------------------------------------
def _check_mean_shower(mean: np.ndarray, binning: Binning, what: str) -> np.ndarray:
    arr = np.asarray(mean, dtype=np.float64)
    if arr.ndim != 1 or arr.shape[0] != binning.n_voxels:
        raise VoxelCountError(
            f"{what}: expected a mean shower of shape ({binning.n_voxels},) for binning {binning.name}, "
            f"got {arr.shape}; average the showers over axis 0 and pass the binning they were made with")
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise InvalidEnergyError(f"{what}: mean voxel energies must be finite and non-negative (MeV)")
    return arr


def _check_showers(incident_energies: np.ndarray, showers: np.ndarray, binning: Binning
                   ) -> tuple[np.ndarray, np.ndarray]:
    energies = np.asarray(incident_energies, dtype=np.float64).reshape(-1)
    sh = np.asarray(showers)
    if sh.ndim != 2 or sh.shape[1] != binning.n_voxels:
        raise VoxelCountError(
            f"expected showers of shape (N, {binning.n_voxels}) for binning {binning.name}, got {sh.shape}")
    if sh.shape[0] != energies.shape[0] or sh.shape[0] == 0:
        raise InvalidEnergyError(
            f"need one incident energy per shower and at least one shower; got {energies.shape[0]} energies "
            f"for {sh.shape[0]} showers")
    if not (np.isfinite(energies).all() and (energies > 0).all()):
        raise InvalidEnergyError("incident energies must be positive and finite (MeV)")
    if not np.isfinite(sh).all() or (sh < 0).any():
        raise InvalidEnergyError("voxel energies must be finite and non-negative (MeV)")
    return energies, sh


# -- polar layer panels -----------------------------------------------------
def _radial_coordinate(r: np.ndarray, binning: Binning) -> np.ndarray:
    """Radius as drawn: ln(1 + r/mm) for dataset 1, whose radial bins span 2 mm to 1.5 m; linear otherwise.

    The challenge draws ln(r) for dataset 1; the +1 keeps the first bin of edge lists such as
    (0, 1, 4, ...) from collapsing to zero width.
    """
    r = np.asarray(r, dtype=np.float64)
    return np.log1p(r) if binning.is_dataset1 else r


def _radial_caption(binning: Binning) -> str:
    r_max = max(layer.r_edges[-1] for layer in binning.layers if layer.is_relevant)
    scale = "drawn as ln(1 + r / mm)" if binning.is_dataset1 else "drawn linearly"
    return f"radius 0 to {r_max:g} mm, {scale}; angle alpha over [-π, π) anticlockwise from the right"


def _layer_mesh(values: np.ndarray, edges_r: tuple[float, ...], n_alpha: int, binning: Binning
                ) -> tuple[np.ndarray, np.ndarray, np.ma.MaskedArray]:
    """Theta edges (T+1,), radius edges (R+1,) and colour values (R, T) for one layer's voxels.

    ``values`` is the layer's slice in (alpha, r) order. Zero voxels are masked (drawn blank).
    """
    n_r = len(edges_r) - 1
    steps = max(1, math.ceil(_MIN_ANGULAR_STEPS / n_alpha))
    theta = np.linspace(-np.pi, np.pi, n_alpha * steps + 1)
    per_alpha = values.reshape(n_alpha, n_r)
    colour = np.repeat(per_alpha, steps, axis=0).T
    return theta, _radial_coordinate(np.asarray(edges_r), binning), np.ma.masked_less_equal(colour, 0.0)


def _colour_norm(*showers: np.ndarray) -> LogNorm:
    """Log colour scale shared by all panels: from the largest mean voxel energy down
    ``COLOUR_DECADES`` decades (or to the smallest non-zero value, if higher)."""
    values = np.concatenate([np.ravel(s) for s in showers])
    positive = values[values > 0]
    if positive.size == 0:
        return LogNorm(vmin=1e-2, vmax=1.0)  # all-zero showers: any scale; every voxel is drawn blank
    vmax = float(positive.max())
    vmin = max(float(positive.min()), vmax * 10.0 ** (-COLOUR_DECADES))
    if vmin >= vmax:
        vmin = vmax / 10.0
    return LogNorm(vmin=vmin, vmax=vmax)


def _cmap() -> mpl.colors.Colormap:
    return mpl.colormaps[_CMAP].with_extremes(bad="white")  # masked (exactly zero): no energy at all


def _draw_layer(ax, shower: np.ndarray, binning: Binning, layer_id: int, norm: LogNorm, r_max: float):
    """One layer of a shower as a polar (alpha, r) panel; returns the mesh."""
    layer = binning.layer(layer_id)
    theta, rho, colour = _layer_mesh(shower[binning.layer_slice(layer_id)], layer.r_edges, layer.n_alpha, binning)
    mesh = ax.pcolormesh(theta, rho, colour, cmap=_cmap(), norm=norm, shading="flat")
    ax.set_ylim(0.0, r_max)  # shared radius: layers keep their relative size
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    return mesh


# Polar-figure geometry in inches. Placed by hand: the panels carry no tick labels, and constrained
# layout took most of the drawing time for the 90 panels of a dataset-2/3 comparison.
_POLAR_GAP, _POLAR_TITLE, _POLAR_TOP, _POLAR_BOTTOM, _POLAR_BAR, _POLAR_BLOCK_GAP = 0.12, 0.28, 0.55, 0.45, 1.25, 0.2


def _polar_figure(blocks: Sequence[tuple[str | None, np.ndarray]], binning: Binning, layers: Sequence[int],
                  path: Path, title: str, *, titles_first_block_only: bool = False) -> Path:
    """Stacked blocks (one per shower, optionally labelled on the left) of per-layer polar panels,
    ``GRID_COLUMNS`` per row at most, with one shared log colour bar on the right."""
    ncols = min(len(layers), GRID_COLUMNS)
    rows = math.ceil(len(layers) / ncols)
    panel = 1.2 if ncols > 6 else 1.7
    left = 0.8 if any(label is not None for label, _ in blocks) else 0.15
    pitch_x, pitch_y = panel + _POLAR_GAP, panel + _POLAR_TITLE
    block_h = rows * pitch_y
    width = left + ncols * pitch_x + _POLAR_BAR
    content_h = len(blocks) * block_h + (len(blocks) - 1) * _POLAR_BLOCK_GAP
    height = _POLAR_TOP + content_h + _POLAR_BOTTOM
    norm = _colour_norm(*(shower for _, shower in blocks))
    r_max = max(_radial_coordinate(np.asarray(binning.layer(i).r_edges), binning)[-1] for i in layers)
    with _figure(width, height, layout=None) as fig:
        mesh = None
        for b, (label, shower) in enumerate(blocks):
            block_top = height - _POLAR_TOP - b * (block_h + _POLAR_BLOCK_GAP)
            for i, layer_id in enumerate(layers):
                row, col = divmod(i, ncols)
                x0, y0 = left + col * pitch_x, block_top - (row + 1) * pitch_y
                ax = fig.add_axes((x0 / width, y0 / height, panel / width, panel / height), projection="polar")
                mesh = _draw_layer(ax, shower, binning, layer_id, norm, r_max)
                if b == 0 or not titles_first_block_only:
                    ax.set_title(f"layer {layer_id}", fontsize="small", pad=3)
            if label is not None:
                fig.text(0.35 / width, (block_top - block_h / 2) / height, label, rotation=90,
                         ha="center", va="center", fontsize="medium")
        cax = fig.add_axes(((width - _POLAR_BAR + 0.3) / width, (_POLAR_BOTTOM + 0.1) / height,
                            0.17 / width, (content_h - 0.3) / height))
        colour_bar = fig.colorbar(mesh, cax=cax, extend="min")
        colour_bar.set_label("mean voxel energy [MeV]", loc="center", fontsize="small")
        fig.text((left + ncols * pitch_x / 2) / width, 0.15 / height, _radial_caption(binning),
                 ha="center", va="bottom", fontsize="small")
        if not any((shower > 0).any() for _, shower in blocks):
            title += " (all voxels are zero)"
        fig.suptitle(title, y=1 - 0.12 / height, va="top")
        return _save(fig, path, dpi=POLAR_DPI, palette=True)


def plot_average_shower(mean_shower: np.ndarray, binning: Binning, path: Path, title: str | None = None) -> Path:
    """Average shower as one polar (r, alpha) panel per relevant layer, log colour scale in MeV.

    Args:
        mean_shower: (n_voxels,) mean voxel energies in MeV, voxel order (layer, alpha, r).
        binning: the binning the showers were made with; datasets 2/3 (45 layers) are drawn as a grid.
        path: PNG to write.
        title: figure title (default names the binning).

    Layers with a single alpha bin appear as rings. Zero voxels are blank; values more than
    ``COLOUR_DECADES`` decades below the maximum take the lowest colour.
    """
    mean = _check_mean_shower(mean_shower, binning, "plot_average_shower")
    return _polar_figure([(None, mean)], binning, binning.relevant_layers, path,
                         title or f"Average shower, {binning.name}")


def plot_average_shower_comparison(reference_mean: np.ndarray, generated_mean: np.ndarray, binning: Binning,
                                   path: Path) -> Path:
    """Reference (top) and generated (bottom) average showers, per layer, on one log colour scale.

    Both arrays are (n_voxels,) mean voxel energies in MeV.
    """
    ref = _check_mean_shower(reference_mean, binning, "plot_average_shower_comparison (reference)")
    gen = _check_mean_shower(generated_mean, binning, "plot_average_shower_comparison (generated)")
    return _polar_figure([("Reference", ref), ("Generated", gen)], binning, binning.relevant_layers, path,
                         f"Average shower, {binning.name}: reference vs generated")


# -- average showers per incident energy ---------------------------------------
def _format_energy(mev: float) -> str:
    if mev < 1e3:
        return f"{mev:.3g} MeV"
    if mev < 1e6:
        return f"{mev / 1e3:.3g} GeV"
    return f"{mev / 1e6:.3g} TeV"


def energy_groups(incident_energies: np.ndarray, max_rows: int = 8) -> list[tuple[str, np.ndarray]]:
    """Split showers into at most ``max_rows`` incident-energy groups for plotting.

    Returns (row label, boolean mask (N,)) pairs ordered by energy, empty groups dropped.
    Discrete energies (at most ``max_rows`` distinct values, or a ladder such as dataset 1's
    2^8..2^22 MeV: at most 64 distinct values with two or more showers each on average) give one
    group per value; a ladder longer than ``max_rows`` is thinned to evenly spaced rungs, always
    keeping the lowest and highest. Continuous energies are grouped in ``max_rows`` log-spaced bins.
    """
    energies = np.asarray(incident_energies, dtype=np.float64).reshape(-1)
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    distinct = np.unique(energies)
    is_ladder = distinct.size <= 64 and energies.size >= 2 * distinct.size
    if distinct.size <= max_rows or is_ladder:
        keep = np.unique(np.round(np.linspace(0, distinct.size - 1, min(max_rows, distinct.size))).astype(int))
        groups = []
        for value in distinct[keep]:
            mask = energies == value
            groups.append((f"{_format_energy(value)}\n{int(mask.sum())} showers", mask))
        return groups
    edges = np.geomspace(distinct[0], distinct[-1], max_rows + 1)
    index = np.clip(np.searchsorted(edges, energies, side="right") - 1, 0, max_rows - 1)
    groups = []
    for i in range(max_rows):
        mask = index == i
        if mask.any():
            label = f"{_format_energy(edges[i])} to\n{_format_energy(edges[i + 1])}\n{int(mask.sum())} showers"
            groups.append((label, mask))
    return groups


def _spread_layers(layers: Sequence[int], at_most: int) -> tuple[int, ...]:
    """Evenly spaced subset of layers (first and last kept) when there are more than ``at_most``."""
    if len(layers) <= at_most:
        return tuple(layers)
    picks = np.unique(np.round(np.linspace(0, len(layers) - 1, at_most)).astype(int))
    return tuple(layers[i] for i in picks)


def plot_average_showers_per_energy(incident_energies: np.ndarray, showers: np.ndarray, binning: Binning,
                                    path: Path, max_rows: int = 8) -> Path:
    """One row of per-layer average showers per incident-energy group, on one shared log colour scale.

    Args:
        incident_energies: (N,) or (N, 1) in MeV.
        showers: (N, n_voxels) voxel energies in MeV.
        binning: the showers' binning.
        path: PNG to write.
        max_rows: at most this many energy rows; see :func:`energy_groups` for how rows are chosen.

    For the 45-layer datasets each row shows ``MAX_LAYERS_PER_ENERGY_ROW`` evenly spaced layers
    (first and last included) so the figure stays readable.
    """
    energies, sh = _check_showers(incident_energies, showers, binning)
    blocks = [(label, sh[mask].mean(axis=0, dtype=np.float64)) for label, mask in energy_groups(energies, max_rows)]
    layers = _spread_layers(binning.relevant_layers, MAX_LAYERS_PER_ENERGY_ROW)
    return _polar_figure(blocks, binning, layers, path, f"Average shower per incident energy, {binning.name}",
                         titles_first_block_only=True)


# -- feature histograms -------------------------------------------------------
@dataclass(frozen=True)
class _Family:
    slug: str                # file name stem
    title: str
    pattern: re.Pattern      # group 1 (if any) is the layer id or incident energy
    panel: str               # panel title format for the captured group


_FAMILIES = (
    _Family("E_tot_E_inc_per_energy", r"$E_\mathrm{tot}/E_\mathrm{inc}$ per incident energy",
            re.compile(r"^E_tot/E_inc_E_(.+)$"), "energy"),
    _Family("E_tot_E_inc", r"$E_\mathrm{tot}/E_\mathrm{inc}$", re.compile(r"^E_tot/E_inc$"), ""),
    _Family("E_layer", "Energy per layer", re.compile(r"^E_layer_(\d+)$"), "layer"),
    _Family("EC_eta", r"Centre of energy in $\eta$", re.compile(r"^EC_eta(?:_layer)?_(\d+)$"), "layer"),
    _Family("EC_phi", r"Centre of energy in $\phi$", re.compile(r"^EC_phi(?:_layer)?_(\d+)$"), "layer"),
    _Family("width_eta", r"Width in $\eta$", re.compile(r"^width_eta(?:_layer)?_(\d+)$"), "layer"),
    _Family("width_phi", r"Width in $\phi$", re.compile(r"^width_phi(?:_layer)?_(\d+)$"), "layer"),
    _Family("EC_r", "Centre of energy in r", re.compile(r"^EC_r(?:_layer)?_(\d+)$"), "layer"),
    _Family("width_r", "Width in r", re.compile(r"^width_r(?:_layer)?_(\d+)$"), "layer"),
    _Family("sparsity", "Sparsity (fraction of empty voxels)", re.compile(r"^sparsity(?:_layer)?_(\d+)$"), "layer"),
    _Family("voxel_energy", "Voxel energy distribution", re.compile(r"^voxel_energy$"), ""),
)
_OTHER = _Family("other", "Other features", re.compile(r"^(.*)$"), "key")


def _classify(key: str) -> tuple[_Family, float, str]:
    """Family, sort value and panel title of a metrics key."""
    for family in _FAMILIES:
        match = family.pattern.match(key)
        if match is None:
            continue
        if family.panel == "layer":
            return family, float(match.group(1)), f"layer {match.group(1)}"
        if family.panel == "energy":
            try:
                energy = float(match.group(1))
            except ValueError:
                return family, math.inf, match.group(1)
            return family, energy, r"$E_\mathrm{inc}$ = " + _format_energy(energy)
        return family, 0.0, ""
    return _OTHER, 0.0, key


def _check_histogram(h: FeatureHistogram) -> None:
    edges, ref, gen = np.asarray(h.bin_edges), np.asarray(h.reference), np.asarray(h.generated)
    if edges.ndim != 1 or edges.size < 2 or ref.shape != (edges.size - 1,) or gen.shape != ref.shape:
        raise ValueError(
            f"feature histogram {h.key!r}: bin_edges {edges.shape}, reference {ref.shape} and generated "
            f"{gen.shape} do not fit (need n_bins + 1 edges and n_bins values each)")


def _draw_histogram(ax, h: FeatureHistogram, panel_title: str, *, log_y: bool, y_label: str) -> None:
    edges = np.asarray(h.bin_edges, dtype=np.float64)
    values = np.concatenate([np.asarray(h.reference, dtype=np.float64), np.asarray(h.generated, dtype=np.float64)])
    positive = values[np.isfinite(values) & (values > 0)]
    ax.stairs(h.reference, edges, fill=True, color=_REFERENCE_COLOUR, alpha=0.35, label="Reference")
    ax.stairs(h.generated, edges, color=_GENERATED_COLOUR, linewidth=1.6, label="Generated")
    if h.log_x:
        ax.set_xscale("log")
    # Headroom above the highest bin keeps the legend off the histograms.
    if log_y and positive.size:
        ax.set_yscale("log")
        low, high = positive.min() / 2.0, positive.max()
        ax.set_ylim(low, high * (high / low) ** 0.35)
    elif positive.size:
        ax.set_ylim(0.0, 1.45 * positive.max())
    ax.set_xlim(edges[0], edges[-1])
    ax.set_xlabel(h.label)
    ax.set_ylabel(y_label)
    sep = f"{h.separation_power:.4f}" if np.isfinite(h.separation_power) else "n/a"
    ax.legend(title=f"sep. power {sep}", loc="upper right", title_fontsize="small")
    if panel_title:
        ax.set_title(panel_title, fontsize="medium")


# Fixed margins in inches for the histogram grids: constrained layout would measure every tick label of
# up to 16 panels (more than half the drawing time) to arrive at about the same numbers.
_PANEL_W, _PANEL_H = 3.0, 2.3
_LEFT, _RIGHT, _BOTTOM, _TOP, _GAP_W, _GAP_H = 0.75, 0.2, 0.55, 0.75, 0.75, 0.85


def _split_panels(n_panels: int, at_most: int = MAX_PANELS_PER_FIGURE) -> list[slice]:
    """Consecutive, balanced figure parts of at most ``at_most`` panels (45 layers: 3 x 15, not 16 + 16 + 13)."""
    n_parts = max(1, math.ceil(n_panels / at_most))
    bounds = np.linspace(0, n_panels, n_parts + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def _grid_size(nrows: int, ncols: int) -> tuple[float, float]:
    width = _LEFT + _RIGHT + ncols * _PANEL_W + (ncols - 1) * _GAP_W
    height = _BOTTOM + _TOP + nrows * _PANEL_H + (nrows - 1) * _GAP_H
    return width, height


def _grid_margins(nrows: int, ncols: int) -> dict[str, float]:
    width, height = _grid_size(nrows, ncols)
    return {"left": _LEFT / width, "right": 1 - _RIGHT / width, "bottom": _BOTTOM / height,
            "top": 1 - _TOP / height, "wspace": _GAP_W / _PANEL_W, "hspace": _GAP_H / _PANEL_H}


def plot_feature_histograms(histograms: Sequence[FeatureHistogram], out_dir: Path) -> list[Path]:
    """One PNG per feature family (E_tot/E_inc, E_layer, EC_eta, ..., voxel_energy, E_tot/E_inc per
    energy), one panel per layer or energy.

    Up to ``MAX_PANELS_PER_FIGURE`` panels are laid out near-square; a family with more (the
    45 layers of datasets 2 and 3) is one grid of ``GRID_COLUMNS`` columns, so each family stays
    one file to open. Reference is drawn filled, generated as a line, the separation power in
    each legend. Files are named ``features_<family>.png``, or ``features_<family>_<i>of<n>.png``
    for a family of more than ``MAX_PANELS_PER_GRID`` panels. Returns the paths written, in family order.
    """
    for h in histograms:
        _check_histogram(h)
    grouped: dict[str, list[tuple[float, str, FeatureHistogram]]] = {}
    families = {f.slug: f for f in (*_FAMILIES, _OTHER)}
    for h in histograms:
        family, order, panel_title = _classify(h.key)
        grouped.setdefault(family.slug, []).append((order, panel_title, h))
    out_dir = Path(out_dir)
    paths = []
    for slug in (f.slug for f in (*_FAMILIES, _OTHER)):
        if slug not in grouped:
            continue
        items = sorted(grouped[slug], key=lambda item: item[0])
        parts = _split_panels(len(items), MAX_PANELS_PER_GRID)
        n_parts = len(parts)
        for part, panels in enumerate(parts):
            chunk = items[panels]
            name = f"features_{slug}.png" if n_parts == 1 else f"features_{slug}_{part + 1}of{n_parts}.png"
            ncols = (min(len(chunk), math.ceil(math.sqrt(len(chunk)))) if len(chunk) <= MAX_PANELS_PER_FIGURE
                     else GRID_COLUMNS)
            nrows = math.ceil(len(chunk) / ncols)
            with _figure(*_grid_size(nrows, ncols), layout=None) as fig:
                axes = fig.subplots(nrows, ncols, squeeze=False, gridspec_kw=_grid_margins(nrows, ncols)).ravel()
                for ax, (_, panel_title, h) in zip(axes, chunk):
                    _draw_histogram(ax, h, panel_title, log_y=(slug == "voxel_energy"),
                                    y_label="fraction of voxels" if slug == "voxel_energy" else "fraction of showers")
                for ax in axes[len(chunk):]:
                    ax.set_visible(False)
                suffix = "" if n_parts == 1 else f" ({part + 1}/{n_parts})"
                fig.suptitle(families[slug].title + suffix, y=1 - 0.15 / fig.get_figheight(), va="top")
                paths.append(_save(fig, out_dir / name))
    return paths


# -- classifier, dimension, training --------------------------------------------
def plot_roc(results: Sequence[ClassifierResult], path: Path) -> Path:
    """ROC curves of the classifier tests (low / low_normed / high) with AUC and JSD in the legend.

    All results must come from one setting ("full" or "quick"), named in the title: the two are
    never mixed in one picture, as they are never mixed in one table.
    """
    if not results:
        raise ValueError("plot_roc needs at least one ClassifierResult")
    settings = sorted({r.setting for r in results})
    if len(settings) > 1:
        raise ValueError(f"classifier results mix settings {settings}; plot each setting separately")
    for r in results:
        fpr, tpr = np.asarray(r.fpr), np.asarray(r.tpr)
        if fpr.ndim != 1 or fpr.shape != tpr.shape:
            raise ValueError(f"classifier result {r.kind!r}: fpr {fpr.shape} and tpr {tpr.shape} must be equal 1-d")
    with _figure(5.5, 5.5) as fig:
        ax = fig.subplots()
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="indistinguishable (AUC 0.5)")
        for r in results:
            name = _CLASSIFIER_NAMES.get(r.kind, r.kind)
            ax.plot(r.fpr, r.tpr, linewidth=1.8, label=f"{name}: AUC {r.auc:.4f}, JSD {r.jsd:.4f}")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.legend(loc="lower right")
        ax.set_title(f"Classifier test, {settings[0]} setting (generated vs reference)", fontsize="medium")
        return _save(fig, path)


def plot_auc_per_energy(results: Sequence[ClassifierResult], path: Path) -> Path:
    """AUC of each classifier test against the incident energy (log x), with the folds' standard errors.

    Needs results of the strong setting (``auc_per_energy`` set), all of one setting.
    """
    if not results or any(not r.auc_per_energy for r in results):
        raise ValueError("plot_auc_per_energy needs classifier results with auc_per_energy (the strong setting)")
    settings = sorted({r.setting for r in results})
    if len(settings) > 1:
        raise ValueError(f"classifier results mix settings {settings}; plot each setting separately")
    with _figure(6.5, 4.5) as fig:
        ax = fig.subplots()
        ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="indistinguishable (AUC 0.5)")
        for r in results:
            keys = sorted(r.auc_per_energy, key=float)
            energies = np.array([float(k) for k in keys]) * 1e-3
            errors = [(r.auc_per_energy_error or {}).get(k, 0.0) for k in keys]
            errors = np.nan_to_num(np.asarray(errors, dtype=np.float64))
            ax.errorbar(energies, [r.auc_per_energy[k] for k in keys], yerr=errors, marker="o", markersize=4,
                        capsize=2, linewidth=1.5,
                        label=f"{_CLASSIFIER_NAMES.get(r.kind, r.kind)}: AUC {r.auc:.3f} overall")
        ax.set_xscale("log")
        ax.set_ylim(0.45, 1.0)
        ax.set_xlabel("incident energy [GeV]")
        ax.set_ylabel("AUC (generated vs reference)")
        ax.legend(loc="upper left", fontsize="small")
        ax.set_title(f"Classifier test per incident energy, {settings[0]} setting", fontsize="medium")
        return _save(fig, path)


def plot_dimension_curve(k_values: np.ndarray, estimates: dict[str, np.ndarray], path: Path) -> Path:
    """Intrinsic-dimension estimate versus the number of nearest neighbours k, one line per label.

    Args:
        k_values: (K,) neighbour counts.
        estimates: label -> (K,) dimension estimates (e.g. "raw", "preprocessed", "E = 1 GeV").
        path: PNG to write.
    """
    k = np.asarray(k_values, dtype=np.float64).reshape(-1)
    if not estimates:
        raise ValueError("plot_dimension_curve needs at least one estimate")
    for label, values in estimates.items():
        if np.asarray(values).shape != k.shape:
            raise ValueError(f"dimension estimate {label!r} has shape {np.asarray(values).shape}, k_values {k.shape}")
    with _figure(6.0, 4.5) as fig:
        ax = fig.subplots()
        for label, values in estimates.items():
            ax.plot(k, values, marker="o", markersize=3.5, linewidth=1.5, label=label)
        if k.size > 1 and k.min() > 0 and k.max() / k.min() >= 10:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel("k (nearest neighbours)")
        ax.set_ylabel("intrinsic dimension estimate")
        ax.legend(loc="best")
        ax.set_title("Intrinsic dimension", fontsize="medium")
        return _save(fig, path)


def plot_training_history(history: dict[str, list[float]], path: Path) -> Path:
    """Training and validation loss per epoch, one panel per stage.

    Keys are ``"<stage>/<split>"`` (e.g. ``"autoencoder/train"``, ``"autoencoder/val"``); a key
    without a slash is its own stage. Train is drawn solid, validation dashed; the loss axis is
    logarithmic when every value of a stage is positive and they span more than a factor 20.
    """
    stages: dict[str, dict[str, np.ndarray]] = {}
    for key, values in history.items():
        stage, _, split = key.rpartition("/")
        stages.setdefault(stage or key, {})[split if stage else key] = np.asarray(values, dtype=np.float64)
    n = max(1, len(stages))
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    with _figure(4.6 * ncols, 3.6 * nrows + 0.4) as fig:
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        if not stages:
            axes[0].text(0.5, 0.5, "no training history recorded", ha="center", va="center",
                         transform=axes[0].transAxes)
        for ax, (stage, splits) in zip(axes, stages.items()):
            every = np.concatenate([v for v in splits.values()]) if splits else np.zeros(0)
            for split, values in splits.items():
                validation = split.startswith("val")
                epochs = np.arange(1, values.size + 1)
                ax.plot(epochs, values, "--" if validation else "-", marker="o" if values.size < 30 else None,
                        markersize=3, linewidth=1.5, label=split)
                if validation and np.isfinite(values).any():
                    best = int(np.nanargmin(np.where(np.isfinite(values), values, np.nan)))
                    ax.plot(epochs[best], values[best], "*", color="black", markersize=9,
                            label=f"best {split} (epoch {best + 1})")
            finite = every[np.isfinite(every)]
            if finite.size and finite.min() > 0 and finite.max() / finite.min() > 20:
                ax.set_yscale("log")
            ax.set_xlabel("epoch")
            ax.set_ylabel("loss")
            ax.set_title(stage, fontsize="medium")
            if splits:
                ax.legend(loc="upper right")
        for ax in axes[len(stages) if stages else 1:]:
            ax.set_visible(False)
        fig.suptitle("Training history")
        return _save(fig, path)

