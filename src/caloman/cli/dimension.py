"""``caloman dimension``: intrinsic-dimension curves d_k of a shower file.

Writes DIR/dimension.json (curves, recommended latent dimension, seed, config,
versions) and DIR/dimension.png, and prints d_k at a few k.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
from pathlib import Path

import numpy as np

from caloman import __version__
from caloman.cli import add_binning_argument, resolve_binning
from caloman.dimension import DEFAULT_RECOMMEND_K, KNN_METHODS, DimensionEstimate, estimate_for_file
from caloman.errors import ConfigError
from caloman.io import atomic_path

logger = logging.getLogger(__name__)

#: k shown in the printed table when estimated (the full curve is in the JSON).
_TABLE_K = (2, 5, 10, 20, 50)

#: Version of the dimension.json layout, bumped when keys change meaning.
FORMAT_VERSION = 1


def parse_k_values(text: str) -> tuple[int, ...]:
    """Parse "2..50" (inclusive range), "2,5,10" or a mix ("2..10,20,50") into sorted distinct k >= 2."""
    ks: set[int] = set()
    try:
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            if ".." in part:
                lo, hi = (int(v) for v in part.split(".."))
                if hi < lo:
                    raise ValueError(f"empty range {part}")
                ks.update(range(lo, hi + 1))
            else:
                ks.add(int(part))
    except ValueError as exc:
        raise ConfigError(f"--k {text!r}: {exc}; write a range '2..50' or a list '2,5,10'") from exc
    if not ks:
        raise ConfigError(f"--k {text!r} names no k; write a range '2..50' or a list '2,5,10'")
    if min(ks) < 2:
        raise ConfigError(f"--k {text!r}: every k must be >= 2 (d_k uses the k-1 nearer neighbours)")
    return tuple(sorted(ks))


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "dimension", help="estimate the intrinsic dimension of showers (Levina-Bickel, MacKay-Ghahramani)",
        description="Intrinsic-dimension curves d_k (Levina-Bickel MLE, MacKay-Ghahramani correction) of a "
                    "shower file, raw and preprocessed; writes DIR/dimension.json and DIR/dimension.png.")
    parser.add_argument("file", type=Path, metavar="FILE", help="CaloChallenge HDF5 shower file")
    add_binning_argument(parser, "FILE")
    parser.add_argument("--k", default="2..50", metavar="KS",
                        help="neighbourhood sizes: range '2..50' (default) or list '2,5,10'")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    parser.add_argument("--max-showers", type=int, default=None, metavar="N",
                        help="use N showers drawn at random (default: all)")
    parser.add_argument("--per-energy", action="store_true", help="also one curve per incident energy (dataset 1)")
    parser.add_argument("--no-preprocessed", dest="preprocessed", action="store_false",
                        help="skip the curve of the model's preprocessed input")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shower subsample (default 0)")
    parser.add_argument("--method", choices=KNN_METHODS, default="auto",
                        help="nearest-neighbour search (default auto = torch blocked brute force)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    ks = parse_k_values(args.k)
    binning = resolve_binning(args.binning, args.file)
    estimate = estimate_for_file(args.file, binning, ks, max_showers=args.max_showers,
                                 per_energy=args.per_energy, preprocess=args.preprocessed,
                                 seed=args.seed, method=args.method)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    config = {"file": str(args.file), "binning": binning, "k": args.k, "max_showers": args.max_showers,
              "per_energy": args.per_energy, "preprocessed": args.preprocessed, "method": args.method}
    recommended = _recommended(estimate)
    document = {"format_version": FORMAT_VERSION, **estimate.to_dict(), "recommended_latent_dim": recommended,
                "seed": args.seed, "config": config, "versions": _versions()}
    json_path = out / "dimension.json"
    with atomic_path(json_path, suffix=".json.tmp") as tmp:
        tmp.write_text(json.dumps(document, indent=2) + "\n")
    png_path = _plot(estimate, out / "dimension.png")

    print(_table(estimate))
    if recommended is not None:
        print(f"recommended latent dimension: {recommended['value']} "
              f"(d_{recommended['k']} of {recommended['label']!r}, rounded)")
    print(f"wrote {json_path} and {png_path}")
    return 0


def _recommended(estimate: DimensionEstimate) -> dict | None:
    try:
        label = estimate.default_label()
        return {"k": DEFAULT_RECOMMEND_K, "label": label, "value": estimate.recommended(DEFAULT_RECOMMEND_K, label)}
    except ConfigError as exc:
        logger.warning("no recommended latent dimension: %s", exc)
        return None


def _plot(estimate: DimensionEstimate, path: Path) -> Path:
    from caloman.plots import plot_dimension_curve  # matplotlib: imported only when plotting

    # plot_dimension_curve writes atomically itself
    return plot_dimension_curve(np.asarray(estimate.k_values), dict(estimate.estimates), path)


def _table(estimate: DimensionEstimate) -> str:
    shown = [k for k in _TABLE_K if k in estimate.k_values]
    if not shown:  # none of the usual k: show up to five spread over the requested ones
        idx = np.unique(np.linspace(0, len(estimate.k_values) - 1, 5).round().astype(int))
        shown = [estimate.k_values[i] for i in idx]
    width = max(len("label"), *(len(label) for label in estimate.estimates))
    lines = [f"{'label':<{width}}  {'n':>7}  " + "  ".join(f"{f'd_{k}':>6}" for k in shown)]
    for label, values in estimate.estimates.items():
        row = "  ".join(f"{values[estimate.k_values.index(k)]:6.2f}" for k in shown)
        lines.append(f"{label:<{width}}  {estimate.n_points[label]:>7d}  {row}")
    return "\n".join(lines)


def _versions() -> dict[str, str]:
    import scipy
    import sklearn
    import torch
    return {"caloman": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "scipy": scipy.__version__, "scikit-learn": sklearn.__version__, "torch": torch.__version__}

