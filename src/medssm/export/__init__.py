"""medssm.export: ONNX export with an onnxruntime parity check (``medssm export``)."""

from .onnx import ExportConfig, ExportParityError, ExportResult, export_onnx

__all__ = ["ExportConfig", "ExportParityError", "ExportResult", "export_onnx"]
