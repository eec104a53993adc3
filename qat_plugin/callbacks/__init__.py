"""Lightning callbacks."""
from .qat import QuantizationAwareTraining

__all__ = ["QuantizationAwareTraining"]
