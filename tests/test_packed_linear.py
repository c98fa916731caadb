"""packed_linear (the CPU GEMM for few rows over a packed weight) against F.linear, and engine/linear.py's
dispatch: our kernel where it runs, MKL's packed GEMM otherwise, F.linear beyond the packed paths."""

import gc
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mope.engine import linear
from mope.kernels import packed_linear

from tests.helpers import (
    PACKED_LINEAR_ISAS,
    PACKED_LINEAR_RUNS,
    assert_within_fp32_rounding,
    on_threads,
    run_python,
)

needs_packed = pytest.mark.skipif(not PACKED_LINEAR_RUNS, reason="needs AVX-512 or AVX2 and a C++ compiler")
# every form of the kernel this CPU runs (AVX-512, AVX2)
every_isa = pytest.mark.parametrize("isa", PACKED_LINEAR_ISAS or ["none"])


@needs_packed
@every_isa
@pytest.mark.parametrize("rows", [*range(1, 14), 31, 256])
@pytest.mark.parametrize("out_features,in_features", [(70, 80), (32, 7), (2304, 768), (5, 300)])
def test_matches_f_linear(isa, rows, out_features, in_features):
    """Row counts around the micro-kernels' 12 (AVX-512) and 6 (AVX2) rows, outputs off and on the
    32-output panels and their 16-output halves, with and without bias."""
    with packed_linear.using_instruction_set(isa):
        g = torch.Generator().manual_seed(rows * out_features)
        x = torch.randn(rows, in_features, generator=g)
        weight = torch.randn(out_features, in_features, generator=g) / in_features**0.5
        bias = torch.randn(out_features, generator=g)
        packed = packed_linear.pack_weight(weight)
        assert packed.panels.shape == (-(-out_features // 32), in_features, 32)
        assert packed.out_features == out_features
        torch.testing.assert_close(packed_linear.packed_linear(x, packed), F.linear(x, weight))
        torch.testing.assert_close(packed_linear.packed_linear(x, packed, bias),
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
        f"for isa in {PACKED_LINEAR_ISAS}:\n"
        "    for rows in (4, 12, 31):\n"
        "        test_matches_f_linear(isa, rows, 2304, 768)\n"
        "        test_matches_f_linear(isa, rows, 70, 80)\n"
        "    for rows in (12, 37):\n"
        "        test_packed_lora_linear_matches_dense_per_row(isa, rows, True)\n"
    )
    run_python(["-c", script], env={"OMP_THREAD_LIMIT": "1"})


@needs_packed
@every_isa
def test_non_contiguous_rows_and_no_rows(isa):
    with packed_linear.using_instruction_set(isa):
        weight = torch.randn(40, 24)
        packed = packed_linear.pack_weight(weight)
        x = torch.randn(24, 6).T  # a transposed view
        torch.testing.assert_close(packed_linear.packed_linear(x, packed), F.linear(x, weight))
        assert packed_linear.packed_linear(torch.randn(0, 24), packed).shape == (0, 40)


def mapping_of(address: int) -> dict | None:
    """The /proc/self/smaps entry of the mapping holding `address`: start, end, huge (AnonHugePages, bytes)
    and flags (VmFlags; "hg": advised MADV_HUGEPAGE)."""
    entry = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split()[0]
        if "-" in first and ":" not in first:
            start, end = (int(a, 16) for a in first.split("-"))
            entry = dict(start=start, end=end) if start <= address < end else None
        elif entry is not None and first == "AnonHugePages:":
            entry["huge"] = int(line.split()[1]) * 1024
        elif entry is not None and first == "VmFlags:":
            return entry | dict(flags=line.split()[1:])
    return None


def thp_setting(name: str) -> str:
    """The selected value of /sys/kernel/mm/transparent_hugepage/<name>, '' where there is none."""
    path = Path("/sys/kernel/mm/transparent_hugepage") / name
    return path.read_text().split("[")[1].split("]")[0] if path.exists() else ""


@needs_packed
@pytest.mark.skipif(sys.platform != "linux", reason="huge pages are Linux's (madvise, /proc/self/smaps)")
def test_packed_weights_live_in_huge_pages_last_one_included_and_are_unmapped_with_the_tensor():
    """Whatever the heap handed out before (freed, touched memory is what malloc reuses, and advice does not
    turn its 4 KB pages into huge ones), a packed weight of at least 2 MB is a 2 MB-aligned mapping of its
    own, rounded up to whole huge pages and advised as such; where the kernel makes huge pages on a fault
    (THP on, compaction allowed) every page is one, the partly used last one too. The mapping goes with
    the tensor."""
    churn = [torch.ones(3 << 20) for _ in range(8)]  # touched memory, then freed: the heap's to reuse
    del churn
    weight = torch.randn(768 + 32, 768)
    packed = packed_linear.pack_weight(weight)  # 2.34 MB: one full page and a tail
    nbytes, address = packed.panels.numel() * 4, packed.panels.data_ptr()
    mapping = mapping_of(address)
    assert address % (2 << 20) == 0 and mapping["start"] == address and "hg" in mapping["flags"]
    assert mapping["end"] - mapping["start"] == 4 << 20 >= nbytes
    if thp_setting("enabled") in ("always", "madvise") and thp_setting("defrag") != "never":
        assert mapping["huge"] == 4 << 20
    x = torch.randn(3, 768)
    assert_within_fp32_rounding(packed_linear.packed_linear(x, packed), x.double() @ weight.double().T,
                                x.double().abs() @ weight.double().abs().T)
    del packed
    gc.collect()
    after = mapping_of(address)  # gone (or, rarely, another mapping at the same address since)
    assert after is None or (after["start"], after["end"]) != (mapping["start"], mapping["end"])


@needs_packed
@pytest.mark.parametrize("case,message", [
    (dict(x=torch.randn(257, 24)), "rows"),
    (dict(x=torch.randn(4, 24).double()), "x"),
    (dict(x=torch.randn(4, 23)), "packed"),
    (dict(packed=None), "packed must come from pack_weight"),
    (dict(packed=torch.zeros(2, 24, 32)), "packed must come from pack_weight"),  # panels without N
    (dict(bias=torch.randn(39)), "bias"),
])
def test_bad_inputs_raise_value_error(case, message):
    weight = torch.randn(40, 24)
    packed = packed_linear.pack_weight(weight)
    args = dict(x=torch.randn(4, 24), packed=packed, bias=None) | case
    with pytest.raises(ValueError, match=message):
        packed_linear.packed_linear(**args)
    with pytest.raises(ValueError, match="weight"):
        packed_linear.pack_weight(weight.double())


@pytest.mark.parametrize("ours", [True, False])
def test_fast_linear_equals_linear_and_follows_weight_updates(ours, monkeypatch):
    """Both packed paths (ours, and MKL's where our kernel does not run), then F.linear past 256 rows or
    with autograd; an in-place update of the weight must not leave a stale packed copy."""
    if ours and not PACKED_LINEAR_RUNS:
        pytest.skip("packed_linear needs AVX-512 or AVX2 and a C++ compiler")
    monkeypatch.setattr(packed_linear, "available", lambda: ours)
    monkeypatch.setattr(linear, "_packed", {})
    layer = linear.Linear(48, 40, bias=True)
    for rows in (1, 7, 32, 256, 300):
        x = torch.randn(rows, 48)
        with torch.inference_mode():
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    packed = linear._packed[id(layer.weight)][2]
    assert packed.panels.shape == (2, 48, 32) if ours else packed.shape != (2, 48, 32)
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


@needs_packed
@pytest.mark.parametrize("rows,out_features,in_features", [
    pytest.param(13, 1, 0, id="k0-past-12-rows"),  # no 128-k slice ran: y was left unwritten (not the bias)
])
@every_isa
def test_regressions(isa, rows, out_features, in_features):
    """Minimal cases the fuzzing below found (each failed before its fix)."""
    with packed_linear.using_instruction_set(isa):
        x, weight = torch.randn(rows, in_features), torch.randn(out_features, in_features)
        bias = torch.randn(out_features)
        packed = packed_linear.pack_weight(weight)
        torch.testing.assert_close(packed_linear.packed_linear(x, packed, bias),
                                   F.linear(x, weight, bias))
        torch.testing.assert_close(packed_linear.packed_linear(x, packed), F.linear(x, weight))



@needs_packed
def test_instruction_sets_and_an_unknown_or_unavailable_one():
    """The kernel lists the forms this CPU runs, as /proc/cpuinfo tells, and refuses any other by name."""
    assert packed_linear.instruction_sets() == PACKED_LINEAR_ISAS
    assert packed_linear.instruction_set() == PACKED_LINEAR_ISAS[0]
    others = ["sse", *(["avx512"] if "avx512" not in PACKED_LINEAR_ISAS else [])]
    for name in others:
        with pytest.raises(ValueError, match=f"instruction set {name} is not one this CPU runs"):
            packed_linear.set_instruction_set(name)
    assert packed_linear.instruction_set() == PACKED_LINEAR_ISAS[0]


@needs_packed
def test_using_instruction_set_restores_the_form_before_however_the_block_ends():
    before = packed_linear.instruction_set()
    for isa in PACKED_LINEAR_ISAS:
        with pytest.raises(RuntimeError, match="inside the block"), packed_linear.using_instruction_set(isa):
            assert packed_linear.instruction_set() == isa
            raise RuntimeError("inside the block")
        assert packed_linear.instruction_set() == before
    with pytest.raises(ValueError, match="instruction set sse"), packed_linear.using_instruction_set("sse"):
        pass
    assert packed_linear.instruction_set() == before


@needs_packed
def test_packed_weight_whose_outputs_do_not_fit_its_panels_raises_value_error():
    """-31..-1 outputs took the 0 panels of an empty weight's packing for a fit (then torch.empty raised a
    RuntimeError), and 70 outputs over 2 panels read past them: a ValueError naming the packed weight."""
    for panels, out_features in ((torch.randn(0, 4), -1), (torch.randn(40, 4), 70)):
        packed = packed_linear.PackedWeight(packed_linear.pack_weight(panels).panels, out_features)
        with pytest.raises(ValueError, match="packed must come from pack_weight"):
            packed_linear.packed_linear(torch.randn(2, 4), packed)


# ---- Property-based fuzzing (hypothesis) against a float64 reference ----
# Row counts around the 12-row micro-kernel and its 12-row chunks up to MAX_ROWS, outputs on and off the
# 32-output panels, K empty, odd and around the 128-k slices, strided x, bias or not, 1 and 2 threads.
FUZZ_ROWS = st.sampled_from([1, 11, 12, 13, 24, 25, 255, 256]) | st.integers(1, packed_linear.MAX_ROWS)
FUZZ_OUT_FEATURES = st.sampled_from([1, 31, 32, 33, 63, 65, 97]) | st.integers(1, 200)
FUZZ_IN_FEATURES = st.sampled_from([0, 1, 7, 127, 128, 129, 257]) | st.integers(1, 300)
FUZZ_LAYOUTS = ("contiguous", "transposed", "column-slice", "every-other-row")
FUZZ_SETTINGS = settings(max_examples=400, deadline=None, derandomize=True,
                         suppress_health_check=[HealthCheck.too_slow])


def fuzz_rows(g: torch.Generator, rows: int, in_features: int, layout: str) -> torch.Tensor:
    """x (rows, in_features) in one of FUZZ_LAYOUTS (strided views as the model hands them over)."""
    if layout == "transposed":
        return torch.randn(in_features, rows, generator=g).T
    if layout == "column-slice":
        return torch.randn(rows, in_features + 5, generator=g)[:, 2 : 2 + in_features]
    if layout == "every-other-row":
        return torch.randn(2 * rows, in_features, generator=g)[::2]
    return torch.randn(rows, in_features, generator=g)


@needs_packed
@FUZZ_SETTINGS
@given(rows=FUZZ_ROWS, out_features=FUZZ_OUT_FEATURES, in_features=FUZZ_IN_FEATURES, bias=st.booleans(),
       layout=st.sampled_from(FUZZ_LAYOUTS), threads=st.sampled_from([1, 2]), seed=st.integers(0, 2**16),
       isa=st.sampled_from(PACKED_LINEAR_ISAS or ["none"]))
def test_fuzz_matches_float64_reference(rows, out_features, in_features, bias, layout, threads, seed, isa):
    g = torch.Generator().manual_seed(seed)
    x = fuzz_rows(g, rows, in_features, layout)
    weight = torch.randn(out_features, in_features, generator=g)
    b = torch.randn(out_features, generator=g) if bias else None
    packed = packed_linear.pack_weight(weight)
    with packed_linear.using_instruction_set(isa):
        out = on_threads(threads, packed_linear.packed_linear, x, packed, b)
    b64 = b.double() if bias else torch.zeros(out_features, dtype=torch.float64)
    assert_within_fp32_rounding(out, x.double() @ weight.double().T + b64,
                                x.double().abs() @ weight.double().abs().T + b64.abs())
