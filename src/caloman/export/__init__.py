"""Deployment outside caloman: a trained run as one ONNX graph with explicit noise
inputs (:func:`export_onnx`), and running such a graph with ONNX Runtime
(:mod:`caloman.export.runtime`). Needs the optional extra ``caloman[export]``
(onnx, onnxruntime); see docs/deployment.md."""

from caloman.export.graph import CONVENTIONS, par04_voxel_order
from caloman.export.onnx_export import ExportResult, export_onnx, sidecar_path

__all__ = ["CONVENTIONS", "ExportResult", "export_onnx", "par04_voxel_order", "sidecar_path"]
