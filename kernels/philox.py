"""Philox4x32-10 in torch integer ops, bit-exact with Triton's ``tl.rand(seed, offset)``.

Every mix_sample backend draws a row's uniform from this stream, keyed by (seed[b], offset[b]) only,
so a row's token does not depend on the batch and the backends agree token for token.
Values are uint32 held in int64 tensors; products are split in 16-bit halves so nothing overflows.
"""

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
# Triton's uint_to_uniform_float scale for 32-bit ints, rounded to fp32 as the kernel does.
_UNIFORM_SCALE = 4.6566127342e-10


def _mul_hi_lo(constant: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32 bits of constant * x for uint32 values, without leaving int64."""
    by_hi = x * (constant >> 16)  # < 2**48
    by_lo = x * (constant & 0xFFFF)  # < 2**48
    hi = (by_hi + (by_lo >> 16)) >> 16
    lo = (((by_hi & 0xFFFF) << 16) + by_lo) & _MASK32
    return hi, lo


def philox4x32(counter: tuple[Tensor, Tensor, Tensor, Tensor], key: tuple[Tensor, Tensor],
               rounds: int = 10) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32 block function (Salmon et al. 2011) on uint32 values stored in int64 tensors."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(rounds):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def philox_uniform(seed: Tensor, offset: Tensor) -> Tensor:
    """fp32 uniforms in [0, 1), one per row: ``tl.rand(seed[b], offset[b])`` for int64 (B,) seed, offset."""
    seed = seed.to(torch.int64)
    offset = offset.to(torch.int64)
    zero = torch.zeros_like(offset)
    key = (seed & _MASK32, (seed >> 32) & _MASK32)
    counter = (offset & _MASK32, (offset >> 32) & _MASK32, zero, zero)
    bits = philox4x32(counter, key)[0]
    # uint_to_uniform_float: reinterpret as int32, fold negatives with ~x, scale below 1.
    signed = torch.where(bits >= 2**31, bits - 2**32, bits)
    folded = torch.where(signed < 0, ~signed, signed)
    return folded.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)
