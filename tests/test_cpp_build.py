"""The C++ CPU kernels build on a machine with a compiler. Without one they fall back to torch with a warning;
with one, a build that fails would otherwise turn every "cpu" backend test into the torch reference checked
against itself, and the packed_linear tests into skips."""

import pytest
import torch
from mope.kernels import decode_layers, packed_linear
from mope.kernels.cpp_build import load_cpp
from mope.kernels.mix_sample import resolve_backend

from tests.helpers import HAS_COMPILER, PACKED_LINEAR_RUNS

CPP_KERNELS = ("mix_sample", "paged_attention", "decoder_ops", "packed_linear", "decode_layers")


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler on this machine")
@pytest.mark.parametrize("name", CPP_KERNELS)
def test_each_cpp_kernel_builds(name):
    assert load_cpp(name) is not None


def test_the_cpu_backends_are_the_cpp_kernels_where_they_can_be():
    assert packed_linear.available() == decode_layers.available() == PACKED_LINEAR_RUNS
    if HAS_COMPILER:
        assert resolve_backend("auto", torch.device("cpu")) == "cpu"
