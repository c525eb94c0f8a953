"""``caloman export RUN --format onnx``: one ONNX graph per trained run, plus a
JSON sidecar that says how to feed it.

The graph is :meth:`~caloman.models.base.ShowerModel.sample_from_noise` traced by
torch's TorchScript-based ONNX exporter (``dynamo=False``: it records the fused
spline inverses as plain operators; the batch axis stays dynamic). Every flow,
the decoder, the inverse preprocessing, the voxel noise, the readout threshold
and the renormalisation are inside; all randomness comes in as explicit noise,
so the same noise gives the same showers in Python, C++ or Geant4.

Before anything is written the graph is run with ONNX Runtime on fresh noise and
compared with the PyTorch sampler (:func:`caloman.export.runtime.compare_showers`);
a graph that disagrees is refused. Both files are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from caloman import __version__
from caloman.errors import ConfigError, ExportError
from caloman.export.graph import CONVENTIONS, CalomanConvention, Par04Convention, par04_mesh, par04_voxel_order
from caloman.export.runtime import Agreement, compare_showers, require_onnxruntime, session_options
from caloman.geometry import Binning
from caloman.io import atomic_path
from caloman.runs import MODEL_FILE, LoadedRun, load_run

logger = logging.getLogger("caloman.export")

SIDECAR_FORMAT = "caloman-onnx/1"
#: ONNX opset of the exported graphs (ONNX Runtime 1.14 and later run it).
OPSET = 17
#: Showers in the self-check; its agreement must be at least this good or the export is refused. A few
#: voxels may differ by one quantum of CaloMan's voxel noise (rounding moves a draw across a count, and
#: the renormalisation spreads that over the layer): docs/deployment.md. A wrong graph is off everywhere.
CHECK_SHOWERS = 16
CHECK_MAX_VOXELS_OFF = 0.1
CHECK_MAX_ENERGY_ERROR = 1e-3
#: Largest relative difference of a shower weight (reweighted runs); a voxel one quantum off moves a weight a little.
CHECK_MAX_WEIGHT_ERROR = 1e-2
#: Par04's condition vector: E_inc / scale, the angle and a two-geometry one-hot (the last three ignored here).
PAR04_CONDITION_SIZE = 4
CALOCHALLENGE_ORDER = ("CaloChallenge (layer, alpha, r): for each layer of the binning XML, for each angular bin, "
                       "the radial bins from inside out")
PAR04_ORDER = ("Par04 (r, phi, z): output i holds CaloChallenge voxel par04.voxel_order[i]; voxels sorted by radial "
               "bin, then angular bin, then layer (the C order of an (n_r, n_phi, n_z) mesh)")


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_onnx` wrote: the graph, its sidecar (and its content) and the self-check."""

    onnx_path: Path
    sidecar_path: Path
    sidecar: dict[str, Any]
    check: Agreement


def sidecar_path(onnx_path: str | Path) -> Path:
    """``model.onnx`` -> ``model.json`` beside it."""
    return Path(onnx_path).with_suffix(".json")


def export_onnx(run: str | Path | LoadedRun, out: str | Path, *, convention: str = "caloman",
                condition_size: int = PAR04_CONDITION_SIZE, opset: int = OPSET, seed: int = 0,
                fused: bool = True) -> ExportResult:
    """Export a trained run as ``out`` (an ``.onnx`` file) and its sidecar ``out`` with ``.json``.

    ``convention``: ``"caloman"`` or ``"par04"`` (:mod:`caloman.export.graph`);
    ``condition_size``: length of the Par04 condition vector (>= 1); ``fused``: record CaloMan's
    sampler in fewer operators (:mod:`caloman.export.graph_caloman`; other models are traced
    as they are either way). Raises
    :class:`ExportError` for a model that cannot be exported (saying why) or a graph that
    fails its self-check, and leaves no output behind on any error.
    """
    require_onnxruntime()
    _require_onnx()
    out = Path(out)
    if out.suffix != ".onnx":
        raise ConfigError(f"--out {out}: give a file name ending in .onnx (the sidecar goes beside it as .json)")
    if convention not in CONVENTIONS:
        raise ConfigError(f"convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")
    if condition_size < 1:
        raise ConfigError(f"the Par04 condition vector needs at least the energy: size >= 1, got {condition_size}")
    loaded = run if isinstance(run, LoadedRun) else load_run(run)
    model = loaded.model.to("cpu").eval()
    refusal = model.export_refusal()
    if refusal is not None:
        raise ExportError(f"cannot export {loaded.run_dir} ({model.kind}): {refusal}")
    if model.weighted and convention == "par04":
        raise ExportError(f"cannot export {loaded.run_dir} in the par04 convention: its showers carry weights "
                          "(a reweighted run) and Par04 reads one output; use --convention caloman, whose graph "
                          "has a second output `weights`, or export the base run")
    low, high = model.trained_energy_range()
    graph = (CalomanConvention(model, fused=fused) if convention == "caloman"
             else Par04Convention(model, energy_scale_mev=high, condition_size=condition_size, fused=fused))
    generator = torch.Generator().manual_seed(seed)
    energies = torch.as_tensor(np.geomspace(low, high, CHECK_SHOWERS), dtype=torch.float32)
    with atomic_path(out, suffix=".onnx.tmp") as onnx_tmp, atomic_path(sidecar_path(out), suffix=".json.tmp") as tmp:
        _trace(graph, _inputs(graph, energies[[0, -1]], generator), onnx_tmp, opset)
        check = _self_check(graph, onnx_tmp, energies, generator, model.threshold)
        sidecar = build_sidecar(loaded, graph, convention, onnx_file=out.name, onnx_sha256=_sha256(onnx_tmp),
                                opset=opset, check=check)
        tmp.write_text(json.dumps(sidecar, indent=1) + "\n")
    logger.debug("exported %s (%s convention) to %s and %s", loaded.run_dir, convention, out, sidecar_path(out))
    return ExportResult(onnx_path=out, sidecar_path=sidecar_path(out), sidecar=sidecar, check=check)


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it)
    except ImportError as exc:
        raise ExportError("ONNX export needs the optional packages onnx and onnxruntime: "
                          "pip install 'caloman[export]'") from exc


def _inputs(graph: nn.Module, energies: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Graph inputs for incident energies (n,) MeV, with noise from ``generator``."""
    shape = graph.model.noise_shape()
    n = len(energies)
    normal = torch.randn(n, shape.normal, generator=generator)
    uniform = torch.rand(n, shape.uniform, generator=generator)
    if isinstance(graph, Par04Convention):
        condition = torch.zeros(n, graph.condition_size)
        condition[:, 0] = energies / graph.energy_scale_mev
        return (torch.cat((normal, uniform, condition), dim=1),)
    return (normal, *((uniform,) if graph.has_uniform else ()), energies.reshape(-1, 1))


def _trace(graph: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, opset: int) -> None:
    names = graph.input_names() + graph.output_names()
    with torch.no_grad():
        graph(*inputs)  # builds the flows' cached sampling plans, so the trace holds constants, not their making
    with warnings.catch_warnings(), torch.no_grad():
        # The tracer warns about every Python branch on a buffer (e.g. "is the quanta table fitted?"):
        # those are constants of the trained model; the self-check catches a graph that is wrong.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="torch.onnx")
        try:
            torch.onnx.export(graph, inputs, str(path), dynamo=False, opset_version=opset,
                              input_names=graph.input_names(), output_names=graph.output_names(),
                              dynamic_axes={name: {0: "batch"} for name in names}, do_constant_folding=True)
        except Exception as exc:  # the exporter raises many kinds; all mean the same to the user
            raise ExportError(f"torch.onnx.export failed for this {graph.model.kind} model ({type(exc).__name__}: "
                              f"{exc}); please report it with the run's config.json") from exc


def _self_check(graph: nn.Module, path: Path, energies: torch.Tensor, generator: torch.Generator,
                threshold_mev: float) -> Agreement:
    """Run the graph with ONNX Runtime at another batch size than traced and compare with torch."""
    ort = require_onnxruntime()
    inputs = _inputs(graph, energies, generator)
    session = ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"])
    got = session.run(None, {name: t.numpy() for name, t in zip(graph.input_names(), inputs)})
    with torch.inference_mode():
        expected = _reference(graph)(*inputs)
    expected = [t.numpy() for t in (expected if isinstance(expected, tuple) else (expected,))]
    scale = 1.0 if isinstance(graph, CalomanConvention) else 1.0 / float(energies.max())
    agreement = compare_showers(got[0], expected[0], threshold_mev * scale,
                                *((got[1], expected[1]) if len(expected) > 1 else ()))
    weights_off = agreement.max_weight_relative_error is not None and (
        agreement.max_weight_relative_error > CHECK_MAX_WEIGHT_ERROR)
    if (agreement.voxels_off > CHECK_MAX_VOXELS_OFF * agreement.voxels
            or agreement.max_energy_relative_error > CHECK_MAX_ENERGY_ERROR or weights_off):
        raise ExportError(f"the exported graph disagrees with the PyTorch sampler ({agreement.voxels_off} of "
                          f"{agreement.voxels} voxels off, shower energies off by up to "
                          f"{agreement.max_energy_relative_error:.2g}, weights by up to "
                          f"{agreement.max_weight_relative_error}); nothing was written; please report it")
    return agreement


def _reference(graph: nn.Module) -> nn.Module:
    """The same convention around the model's own ``sample_from_noise``: what the graph must match."""
    if isinstance(graph, Par04Convention):
        return Par04Convention(graph.model, graph.energy_scale_mev, graph.condition_size, fused=False)
    return CalomanConvention(graph.model, fused=False)


def binning_xml(binning: Binning) -> str:
    """The text of the binning XML a run was trained with."""
    prefix = "caloman.binnings/"
    if binning.source.startswith(prefix):
        return resources.files("caloman.binnings").joinpath(binning.source[len(prefix):]).read_text()
    return Path(binning.source).read_text()


def build_sidecar(loaded: LoadedRun, graph: nn.Module, convention: str, *, onnx_file: str, onnx_sha256: str,
                  opset: int, check: Agreement) -> dict[str, Any]:
    """The content of ``model.json`` (see docs/deployment.md)."""
    model, binning = loaded.model, loaded.binning
    shape = model.noise_shape()
    low, high = model.trained_energy_range()
    sidecar: dict[str, Any] = {
        "format": SIDECAR_FORMAT,
        "caloman_version": __version__,
        "torch_version": torch.__version__,
        "onnxruntime_version": require_onnxruntime().__version__,
        "opset": opset,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "convention": convention,
        # "fused": CaloMan's flows and decoder input rearranged into fewer operators (caloman.export.graph_caloman).
        "graph": "fused" if graph.sampler.fused else "traced",
        "onnx_file": onnx_file,
        "onnx_sha256": onnx_sha256,
        "run": {"dir": str(loaded.run_dir), "model_kind": model.kind, "created": loaded.config.created,
                "model_sha256": loaded.config.files.get(MODEL_FILE)},
        "binning": {"name": binning.name, "source": binning.source, "n_voxels": binning.n_voxels,
                    "readout_threshold_mev": model.threshold, "voxel_order": CALOCHALLENGE_ORDER,
                    "xml": binning_xml(binning)},
        "energy_range_mev": [low, high],
        "noise": {"normal": shape.normal, "uniform": shape.uniform,
                  "blocks": [{"name": b.name, "size": b.size, "distribution": b.distribution} for b in shape.blocks]},
        # Flat scalars, so that a reader without a JSON library (examples/onnx_inference.cpp) finds them.
        "runtime": {"n_normal": shape.normal, "n_uniform": shape.uniform, "n_voxels": binning.n_voxels,
                    "energy_min_mev": low, "energy_max_mev": high, "is_par04": int(convention == "par04"),
                    "input_size": getattr(graph, "input_size", 0), "weighted": int(model.weighted)},
        "inputs": _input_specs(graph, shape.normal, shape.uniform),
        "outputs": _output_specs(graph, binning.n_voxels),
        "check": check.to_dict(),
    }
    if loaded.refinement is not None:
        sidecar["refinement"] = refinement_entry(loaded)
    if isinstance(graph, Par04Convention):
        sidecar["runtime"]["energy_scale_mev"] = graph.energy_scale_mev
        sidecar["par04"] = {
            "energy_scale_mev": graph.energy_scale_mev,
            "condition": [{"name": "energy", "value": "E_inc / energy_scale_mev"},
                          *({"name": f"condition_{i}", "value": "ignored (Par04: angle, geometry one-hot)"}
                            for i in range(1, graph.condition_size))],
            "mesh": par04_mesh(binning),
            "voxel_order": par04_voxel_order(binning).tolist(),
        }
    return sidecar


def refinement_entry(loaded: LoadedRun) -> dict[str, Any]:
    """What the sidecar says about a refined run: its method, base run and what the graph does."""
    config = loaded.refinement or {}
    method = config.get("method")
    what = {"reweight": "the base run's sampler plus the DCTR classifier: output `weights` holds each shower's "
                        "weight; every estimate must weight the showers (sum w f / sum w), as caloman evaluate does",
            "refiner": "the refiner flow maps the `refiner` noise block to the base run's latent, then the "
                       "unchanged base sampler; showers are unweighted"}.get(method, "")
    return {"method": method, "graph": what, "base_run": config.get("base_run", {}).get("absolute_path"),
            "refinement_sha256": config.get("files", {}).get("refinement.safetensors")}


def _input_specs(graph: nn.Module, n_normal: int, n_uniform: int) -> list[dict[str, Any]]:
    normal = {"name": "normal_noise", "shape": ["batch", n_normal], "dtype": "float32",
              "content": "standard normal noise, blocks as in noise.blocks (normal ones)"}
    uniform = {"name": "uniform_noise", "shape": ["batch", n_uniform], "dtype": "float32",
               "content": "noise uniform on [0, 1), blocks as in noise.blocks (uniform ones)"}
    energy = {"name": "incident_energy", "shape": ["batch", 1], "dtype": "float32", "unit": "MeV",
              "content": "incident energy"}
    if isinstance(graph, Par04Convention):
        return [{"name": "input", "shape": ["batch", graph.input_size], "dtype": "float32",
                 "content": f"[normal noise ({n_normal}), uniform noise ({n_uniform}), condition "
                            f"({graph.condition_size}): par04.condition]"}]
    return [normal, *([uniform] if n_uniform else []), energy]


def _output_specs(graph: nn.Module, n_voxels: int) -> list[dict[str, Any]]:
    if isinstance(graph, Par04Convention):
        return [{"name": "output", "shape": ["batch", n_voxels], "dtype": "float32", "unit": "1 (E / E_inc)",
                 "content": "voxel energies divided by the incident energy", "order": PAR04_ORDER}]
    showers = {"name": "showers", "shape": ["batch", n_voxels], "dtype": "float32", "unit": "MeV",
               "content": "voxel energies after the readout threshold", "order": CALOCHALLENGE_ORDER}
    weights = {"name": "weights", "shape": ["batch"], "dtype": "float32", "unit": "1",
               "content": "the shower's weight (DCTR reweighting); estimates must weight the showers"}
    return [showers, *([weights] if getattr(graph, "weighted", False) else [])]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


__all__ = ["export_onnx", "ExportResult", "build_sidecar", "sidecar_path", "binning_xml", "OPSET",
           "PAR04_CONDITION_SIZE", "SIDECAR_FORMAT"]
