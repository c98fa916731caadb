"""Ahead-of-time compilation of every Triton kernel of the project for real GPU targets, no GPU needed.

`TRITON_KERNELS` names each kernel with a representative signature (the argument types of a typical
launch) and its constexprs; `compile_all(cap)` compiles them all for compute capability `cap` (80: A100,
90: H100) and reports each one's registers per thread, spill bytes and shared memory, read from the
`ptxas -v` report of the same ptxas and options Triton uses. This catches what the interpreter cannot
(non-constexpr shapes, type errors, illegal layouts). Run it with TRITON_INTERPRET unset (under the
interpreter `triton.jit` returns objects that cannot be compiled):

    python -m mope.kernels.aot 80 90
"""

import os
import re
import subprocess
import sys
import tempfile
from typing import NamedTuple

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import lora_triton, mix_triton, paged_attention_triton


class AotKernel(NamedTuple):
    fn: object  # a triton.JITFunction
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int


class ResourceUsage(NamedTuple):
    n_regs: int  # registers per thread
    n_spills: int  # bytes of spill stores per thread
    shared: int  # bytes of shared memory per program


def _signature(fn, types: dict[str, str]) -> dict[str, str]:
    """Every argument of `fn` in order: its type from `types`, else "constexpr"."""
    return {name: types.get(name, "constexpr") for name in fn.arg_names}


def _mix_sample(logit_mode: bool, dtype: str) -> AotKernel:
    fn = mix_triton.mix_sample_kernel
    types = dict.fromkeys(("stride_k", "stride_b"), "i64") | {"V": "i32", "logits_ptr": f"*{dtype}"}
    for name in ("weights_ptr", "temperature_ptr", "top_p_ptr", "scratch_ptr", "logprobs_ptr",
                 "expert_logprobs_ptr"):
        types[name] = "*fp32"
    for name in ("top_k_ptr", "seed_ptr", "offset_ptr", "tokens_ptr"):
        types[name] = "*i64"
    constexprs = dict(K=3, LOGIT_MODE=logit_mode, BLOCK_K=4, BLOCK=mix_triton.BLOCK_V,
                      BLOCK_SEARCH=mix_triton.BLOCK_SEARCH, PIVOTS=mix_triton.NUM_PIVOTS)
    return AotKernel(fn, _signature(fn, types), constexprs, mix_triton.NUM_WARPS)


def _mix_logprobs(logit_mode: bool) -> AotKernel:
    fn = mix_triton.mix_logprobs_kernel
    types = {"logits_ptr": "*bf16", "stride_k": "i64", "stride_b": "i64", "tokens_ptr": "*i64", "V": "i32"}
    for name in ("weights_ptr", "temperature_ptr", "logp_ptr", "token_logp_ptr", "mean_logp_ptr"):
        types[name] = "*fp32"
    constexprs = dict(K=3, LOGIT_MODE=logit_mode, BLOCK_K=4, BLOCK=mix_triton.BLOCK_V)
    return AotKernel(fn, _signature(fn, types), constexprs, mix_triton.NUM_WARPS)


def _paged_attention(group: int, head_dim: int) -> AotKernel:
    fn = paged_attention_triton.paged_decode_attention_kernel
    types = {name: "i64" for name in fn.arg_names if name.startswith("stride_")}
    types |= dict.fromkeys(("q_ptr", "k_ptr", "v_ptr", "out_ptr"), "*bf16")
    types |= {"block_tables_ptr": "*i32", "context_lens_ptr": "*i32", "scale": "fp32", "block_size": "i32"}
    constexprs = dict(HEAD_DIM=head_dim, GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)),
                      BLOCK_D=head_dim, BLOCK_N=paged_attention_triton.BLOCK_N, PRECISION="tf32")
    return AotKernel(fn, _signature(fn, types), constexprs, paged_attention_triton.NUM_WARPS)


def _lora(fn, dtype: str) -> AotKernel:
    types = {name: "i64" for name in fn.arg_names if name.startswith("stride_")}
    types |= dict.fromkeys(("order_ptr", "seg_start_ptr", "seg_count_ptr", "tile_end_ptr"), "*i32")
    types |= dict.fromkeys(("L", "H", "R", "OUT"), "i32")
    types |= {"x_ptr": f"*{dtype}", "a_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "out_ptr": f"*{dtype}",
              "y_ptr": "*fp32", "scaling_ptr": "*fp32"}
    constexprs = dict(BLOCK_L=4, BLOCK=lora_triton.BLOCK_M, BLOCK_R=64, PRECISION="tf32")
    constexprs |= {"BLOCK_H": lora_triton.BLOCK_H} if "BLOCK_H" in fn.arg_names else {
        "BLOCK_O": lora_triton.BLOCK_O}
    return AotKernel(fn, _signature(fn, types), constexprs, lora_triton.NUM_WARPS)


TRITON_KERNELS: dict[str, AotKernel] = {
    "mix_sample_prob_bf16": _mix_sample(False, "bf16"),
    "mix_sample_logit_fp32": _mix_sample(True, "fp32"),
    "mix_logprobs_prob": _mix_logprobs(False),
    "mix_logprobs_logit": _mix_logprobs(True),
    "paged_decode_attention_gqa4_d128": _paged_attention(4, 128),
    "paged_decode_attention_mha_d64": _paged_attention(1, 64),
    "lora_shrink_bf16": _lora(lora_triton.lora_shrink_kernel, "bf16"),
    "lora_expand_bf16": _lora(lora_triton.lora_expand_kernel, "bf16"),
}


def compile_kernel(kernel: AotKernel, cap: int):
    """triton.compile for CUDA compute capability `cap`; returns the CompiledKernel."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise ValueError("TRITON_INTERPRET=1 is set: unset it to compile kernels ahead of time")
    source = ASTSource(fn=kernel.fn, signature=kernel.signature, constexprs=kernel.constexprs)
    return triton.compile(source, target=GPUTarget("cuda", cap, 32), options={"num_warps": kernel.num_warps})


def resource_usage(compiled, cap: int) -> ResourceUsage:
    """Registers and spills from `ptxas -v` on the PTX (Triton's ptxas and flags); shared from Triton."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        report = subprocess.run(
            [get_ptxas(cap).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
             f"--gpu-name={sm_arch_from_capability(cap)}", ptx, "-o", os.path.join(tmp, "kernel.cubin")],
            capture_output=True, text=True, check=True,
        ).stderr
    regs = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    if regs is None:
        raise ValueError(f"no register count in the ptxas report:\n{report}")
    return ResourceUsage(int(regs.group(1)), int(spills.group(1)) if spills else 0, compiled.metadata.shared)


def compile_all(cap: int) -> dict[str, ResourceUsage]:
    """Compile every kernel of TRITON_KERNELS for `cap`; name -> (n_regs, n_spills, shared)."""
    return {name: resource_usage(compile_kernel(kernel, cap), cap) for name, kernel in TRITON_KERNELS.items()}


def main(argv: list[str]) -> None:
    for cap in [int(arg) for arg in argv] or [80, 90]:
        for name, usage in compile_all(cap).items():
            print(f"sm_{cap} {name:36s} regs {usage.n_regs:4d}  spill bytes {usage.n_spills:4d}  "
                  f"shared {usage.shared:6d}")


if __name__ == "__main__":
    main(sys.argv[1:])
