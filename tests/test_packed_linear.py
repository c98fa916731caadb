"""packed_linear (the CPU GEMM for few rows over a packed weight) against F.linear, and engine/linear.py's
dispatch: our kernel where it runs, MKL's packed GEMM otherwise, F.linear beyond the packed paths."""

import gc

import pytest
import torch
import torch.nn.functional as F
from mope.engine import linear
from mope.kernels import packed_linear

from tests.helpers import PACKED_LINEAR_RUNS, run_python

needs_packed = pytest.mark.skipif(not PACKED_LINEAR_RUNS, reason="needs AVX-512 and a C++ compiler")


@needs_packed
@pytest.mark.parametrize("rows", [*range(1, 14), 31, 256])
@pytest.mark.parametrize("out_features,in_features", [(70, 80), (32, 7), (2304, 768), (5, 300)])
def test_matches_f_linear(rows, out_features, in_features):
    """Row counts around the 12-row micro-kernel, outputs off and on the 32-output panels, with and
    without bias."""
    g = torch.Generator().manual_seed(rows * out_features)
    x = torch.randn(rows, in_features, generator=g)
    weight = torch.randn(out_features, in_features, generator=g) / in_features**0.5
    bias = torch.randn(out_features, generator=g)
    packed = packed_linear.pack_weight(weight)
    assert packed.shape == (-(-out_features // 32), in_features, 32)
    torch.testing.assert_close(packed_linear.packed_linear(x, packed, out_features), F.linear(x, weight))
    torch.testing.assert_close(packed_linear.packed_linear(x, packed, out_features, bias),
                               F.linear(x, weight, bias))


@needs_packed
def test_a_missing_threads_panels_are_taken_by_the_others():
    """The threads split the panels into contiguous runs and, once through their own, take panels from the
    end of the others' runs. With OpenMP held to one thread while torch's pool has two, thread 0 must take
    all of thread 1's run that way: plain and LoRA results must still be right. A fresh process: OpenMP
    reads the limit at start."""
    script = (
        "import torch\n"
        "torch.set_num_threads(2)\n"
        "from tests.test_packed_linear import test_matches_f_linear\n"
        "from tests.test_lora_kernels import test_packed_lora_linear_matches_dense_per_row\n"
        "for rows in (4, 12, 31):\n"
        "    test_matches_f_linear(rows, 2304, 768)\n"
        "    test_matches_f_linear(rows, 70, 80)\n"
        "for rows in (12, 37):\n"
        "    test_packed_lora_linear_matches_dense_per_row(rows, True)\n"
    )
    run_python(["-c", script], env={"OMP_THREAD_LIMIT": "1"})


@needs_packed
def test_non_contiguous_rows_and_no_rows():
    weight = torch.randn(40, 24)
    packed = packed_linear.pack_weight(weight)
    x = torch.randn(24, 6).T  # a transposed view
    torch.testing.assert_close(packed_linear.packed_linear(x, packed, 40), F.linear(x, weight))
    assert packed_linear.packed_linear(torch.randn(0, 24), packed, 40).shape == (0, 40)


@needs_packed
@pytest.mark.parametrize("case,message", [
    (dict(x=torch.randn(257, 24)), "rows"),
    (dict(x=torch.randn(4, 24).double()), "x"),
    (dict(x=torch.randn(4, 23)), "packed"),
    (dict(out_features=70), "packed"),
    (dict(bias=torch.randn(39)), "bias"),
])
def test_bad_inputs_raise_value_error(case, message):
    weight = torch.randn(40, 24)
    packed = packed_linear.pack_weight(weight)
    args = dict(x=torch.randn(4, 24), packed=packed, out_features=40, bias=None) | case
    with pytest.raises(ValueError, match=message):
        packed_linear.packed_linear(**args)
    with pytest.raises(ValueError, match="weight"):
        packed_linear.pack_weight(weight.double())


@pytest.mark.parametrize("ours", [True, False])
def test_fast_linear_equals_linear_and_follows_weight_updates(ours, monkeypatch):
    """Both packed paths (ours, and MKL's where our kernel does not run), then F.linear past 256 rows or
    with autograd; an in-place update of the weight must not leave a stale packed copy."""
    if ours and not PACKED_LINEAR_RUNS:
        pytest.skip("packed_linear needs AVX-512 and a C++ compiler")
    monkeypatch.setattr(packed_linear, "available", lambda: ours)
    monkeypatch.setattr(linear, "_packed", {})
    layer = linear.Linear(48, 40, bias=True)
    for rows in (1, 7, 32, 256, 300):
        x = torch.randn(rows, 48)
        with torch.inference_mode():
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    packed = linear._packed[id(layer.weight)][2]
    assert packed.shape == (2, 48, 32) if ours else packed.shape != (2, 48, 32)
    x = torch.randn(16, 48)
    with torch.no_grad():
        layer(x)
        layer.weight.mul_(-2.0)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    layer(x).sum().backward()  # with autograd on it is a differentiable F.linear
    torch.testing.assert_close(layer.weight.grad, x.sum(0).expand(40, 48))
    key = id(layer.weight)
    del layer
    gc.collect()
    assert key not in linear._packed  # the packed copy leaves with its weight
