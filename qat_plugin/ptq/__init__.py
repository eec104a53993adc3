"""Post-training tools: cross-layer equalization (+ high-bias absorption), bias correction,
AdaRound, and :class:`PTQConfig` that runs them in order (callback, recipes, CLI)."""
from .adaround import AdaroundLayer, AdaroundReport, apply_adaround
from .bias_correction import correct_bias
from .cle import equalize_model
from .pipeline import PTQConfig

__all__ = ["AdaroundLayer", "AdaroundReport", "PTQConfig", "apply_adaround", "correct_bias", "equalize_model"]
