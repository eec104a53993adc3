"""qat_plugin: quantization-aware training with target-correct placement and INT8 ONNX export."""
from .config import RuntimeConfig, load_config, preset_names
from .encoding import Encoding
from .errors import CalibrationError, NotCalibratedError, QuantConfigError, UnsupportedModelError
from .quantizer import QuantizeDequantize
from .quantsim import QuantSimModel

__all__ = [
    "CalibrationError", "Encoding", "NotCalibratedError", "QuantConfigError", "QuantSimModel",
    "QuantizeDequantize", "RuntimeConfig", "UnsupportedModelError", "load_config", "preset_names",
]
__version__ = "0.1.0"
