"""MoPE Engine: serve and train a Mixture of Preference Experts.

Public names are imported lazily, so that ``import mope.kernels`` stays light.
"""

from importlib import import_module

_EXPORTS = {
    "Engine": "mope.api",
    "UniformWeights": "mope.api",
    "SamplingParams": "mope.engine.sampling_params",
    "Output": "mope.engine.engine",
    "PCM": "mope.pcm",
    "Preference": "mope.preferences",
    "Dimension": "mope.preferences",
    "PreferenceRegistry": "mope.preferences",
    "default_registry": "mope.preferences",
    "RewardModel": "mope.rewards",
    "HFRewardModel": "mope.rewards",
    "bt_normalize": "mope.rewards",
    "register_scorer": "mope.rewards",
    "rebel_loss": "mope.rebel",
    "TrainConfig": "mope.config",
    "Trainer": "mope.trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mope' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
