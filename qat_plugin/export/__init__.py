"""Export: QDQ ONNX with INT8 initializers, AIMET-format encodings, ONNX Runtime verification."""
from .encodings import EncodingsFile, load_encodings, write_encodings
from .onnx import ExportResult, export_onnx
from .verify import VerifyReport, verify

__all__ = ["EncodingsFile", "ExportResult", "VerifyReport", "export_onnx", "load_encodings", "verify",
           "write_encodings"]
