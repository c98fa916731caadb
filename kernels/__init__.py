"""mope.kernels: fused mix-and-sample and the other kernels of the engine (torch reference, C++, Triton)."""

from .mix_logprobs import mix_logprobs
from .mix_sample import MixSample, mix_sample

__all__ = ["MixSample", "mix_logprobs", "mix_sample"]
