"""Fighting catastrophic forgetting: the mitigations are loss terms (KL to the original model,
EWC, L2-SP) and data options (replay), configured by the run's `forgetting:` section
(`ForgettingConfig`); WiSE-FT interpolates a finished run back towards the original weights
(`deltatune interpolate`). Measuring forgetting is evaluation: deltatune/eval/forgetting.py."""
from deltatune.forgetting.config import ForgettingConfig

__all__ = ["ForgettingConfig"]
