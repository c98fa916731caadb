"""mope.engine: K expert LLMs and a weight provider decoding over one paged KV cache."""

from mope.engine.engine import Engine, Output
from mope.engine.sampling_params import SamplingParams
from mope.engine.weight_provider import WeightProvider

__all__ = ["Engine", "Output", "SamplingParams", "WeightProvider"]
