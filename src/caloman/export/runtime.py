"""Running an exported graph with ONNX Runtime, and comparing its showers with
the PyTorch sampler's.

Used by the export's self-check, ``caloman benchmark`` and the tests; the
stand-alone examples (``examples/onnx_inference.py``) do the same with
onnxruntime and numpy alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from caloman.errors import ExportError

#: Relative and absolute (MeV) tolerance of one voxel in :func:`compare_showers`.
VOXEL_RTOL = 1e-4
VOXEL_ATOL_MEV = 1e-6


def require_onnxruntime() -> Any:
    """The onnxruntime module, or :class:`ExportError` saying how to install it."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise ExportError("ONNX export and ONNX Runtime timings need the optional packages onnx and onnxruntime: "
                          "pip install 'caloman[export]'") from exc
    return onnxruntime


def session_options(intra_op_threads: int = 1, *, batch_size: int | None = None) -> Any:
    """ONNX Runtime session options: ``intra_op_threads`` threads within an operator, one
    operator at a time (sequential execution, one inter-op thread), all graph optimisations;
    with ``batch_size``, the graphs' ``batch`` axis fixed to it (ONNX Runtime then plans
    every shape once; the session accepts only that batch size)."""
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(intra_op_threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if batch_size is not None:
        options.add_free_dimension_override_by_name("batch", int(batch_size))
    return options


def providers(device: str = "cpu") -> list[str]:
    """Execution providers for ``"cpu"`` or ``"cuda"`` (CUDA with the CPU as fallback)."""
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]


def available_devices() -> list[str]:
    """``["cpu"]``, plus ``"cuda"`` when this onnxruntime build has the CUDA provider."""
    ort = require_onnxruntime()
    return ["cpu", "cuda"] if "CUDAExecutionProvider" in ort.get_available_providers() else ["cpu"]


#: Most noise numbers (showers x noise per shower) one ONNX Runtime call of
#: :class:`OnnxSampler` gets; larger batches run in pieces (dataset 3: 276 showers a call,
#: dataset 1: up to 29,000). Kept apart from torch (this module does not import it).
NOISE_VALUES = 2**25


class OnnxSampler:
    """An exported graph in the ``caloman`` convention as a sampler: incident energies
    (n,) in MeV -> showers (n, V) in MeV, float32, with noise from a numpy generator.

    Arguments:
        path: the ``.onnx`` file.
        n_normal, n_uniform: noise numbers per shower (the sidecar's ``runtime`` entries).
        threads: intra-op threads; device: ``"cpu"`` or ``"cuda"``; seed: of the noise.
    """

    def __init__(self, path: str | Path, n_normal: int, n_uniform: int, *, threads: int = 1, device: str = "cpu",
                 seed: int = 0) -> None:
        ort = require_onnxruntime()
        self.session = ort.InferenceSession(str(path), session_options(threads), providers=providers(device))
        self.n_normal, self.n_uniform = int(n_normal), int(n_uniform)
        self.threads, self.device = int(threads), device
        self.rng = np.random.default_rng(seed)

    def run(self, incident_energies: np.ndarray, normal: np.ndarray, uniform: np.ndarray | None = None
            ) -> np.ndarray:
        """Showers (n, V) in MeV for energies (n,) MeV and the given noise, float32."""
        feeds = {"normal_noise": np.ascontiguousarray(normal, dtype=np.float32),
                 "incident_energy": np.asarray(incident_energies, dtype=np.float32).reshape(-1, 1)}
        if self.n_uniform:
            feeds["uniform_noise"] = np.ascontiguousarray(uniform, dtype=np.float32)
        return self.session.run(None, feeds)[0]

    def __call__(self, incident_energies: np.ndarray) -> np.ndarray:
        """Showers for energies (n,) MeV with fresh noise; like ``ShowerModel.sample``, a batch
        whose noise would exceed ``NOISE_VALUES`` numbers runs in pieces (bounded memory)."""
        piece = max(1, NOISE_VALUES // max(1, self.n_normal + self.n_uniform))
        parts = []
        for start in range(0, max(len(incident_energies), 1), piece):
            n = len(incident_energies[start:start + piece])
            normal = self.rng.standard_normal((n, self.n_normal), dtype=np.float32)
            uniform = self.rng.random((n, self.n_uniform), dtype=np.float32) if self.n_uniform else None
            parts.append(self.run(incident_energies[start:start + piece], normal, uniform))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


@dataclass(frozen=True)
class Agreement:
    """How closely two sets of showers (n, V) in MeV agree, ONNX Runtime against PyTorch.

    max_relative_error: largest |a - b| / |b| over voxels with b above the readout threshold.
    voxels_off: voxels outside rtol 1e-4 / atol 1e-6 MeV; voxels: all compared.
    max_energy_relative_error: largest relative difference of a shower's total energy.
    max_weight_relative_error: largest relative difference of a shower weight (weighted
    generators; None otherwise).
    """

    showers: int
    voxels: int
    voxels_off: int
    max_relative_error: float
    max_energy_relative_error: float
    max_weight_relative_error: float | None = None

    def to_dict(self) -> dict[str, float | int | None]:
        out = {"showers": self.showers, "voxels": self.voxels, "voxels_off": self.voxels_off,
               "max_relative_error": self.max_relative_error,
               "max_energy_relative_error": self.max_energy_relative_error}
        if self.max_weight_relative_error is not None:
            out["max_weight_relative_error"] = self.max_weight_relative_error
        return out


def compare_showers(onnx_showers: np.ndarray, torch_showers: np.ndarray, threshold_mev: float,
                    onnx_weights: np.ndarray | None = None, torch_weights: np.ndarray | None = None) -> Agreement:
    """:class:`Agreement` of ``onnx_showers`` with ``torch_showers`` (n, V) in MeV (and of
    the weights (n,) of a weighted generator, when given)."""
    a, b = np.asarray(onnx_showers, np.float64), np.asarray(torch_showers, np.float64)
    off = ~np.isclose(a, b, rtol=VOXEL_RTOL, atol=VOXEL_ATOL_MEV)
    lit = np.abs(b) >= max(threshold_mev, VOXEL_ATOL_MEV)
    relative = np.abs(a - b)[lit] / np.abs(b[lit]) if lit.any() else np.zeros(1)
    totals = b.sum(1)
    energy = np.abs(a.sum(1) - totals) / np.maximum(np.abs(totals), VOXEL_ATOL_MEV)
    weight_error = None
    if torch_weights is not None:
        wa, wb = np.asarray(onnx_weights, np.float64), np.asarray(torch_weights, np.float64)
        weight_error = float((np.abs(wa - wb) / np.maximum(np.abs(wb), 1e-30)).max())
    return Agreement(showers=int(b.shape[0]), voxels=int(b.size), voxels_off=int(off.sum()),
                     max_relative_error=float(relative.max()), max_energy_relative_error=float(energy.max()),
                     max_weight_relative_error=weight_error)


__all__ = ["OnnxSampler", "Agreement", "compare_showers", "session_options", "providers", "available_devices",
           "require_onnxruntime", "VOXEL_RTOL", "VOXEL_ATOL_MEV"]
