"""philox_uniform is bit-exact with Triton's tl.rand (run in the interpreter) and with Philox4x32-10."""

import torch
import triton
import triton.language as tl
from mope.kernels.philox import philox4x32, philox_uniform


@triton.jit
def _tl_rand_per_row(seed_ptr, offset_ptr, out_ptr):
    row = tl.program_id(0)
    seed = tl.load(seed_ptr + row)
    offset = tl.load(offset_ptr + row)
    tl.store(out_ptr + row, tl.rand(seed, offset))


def _edge_and_random_int64(n: int, generator: torch.Generator) -> torch.Tensor:
    edges = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62 + 12345, 2**63 - 1, -1, -(2**63)])
    random = torch.randint(-(2**63), 2**63 - 1, (n - len(edges),), generator=generator, dtype=torch.int64)
    return torch.cat([edges, random])


def test_philox_uniform_bit_exact_with_triton_tl_rand():
    g = torch.Generator().manual_seed(0)
    n = 64
    seed = _edge_and_random_int64(n, g)
    offset = _edge_and_random_int64(n, g)[torch.randperm(n, generator=g)]
    expected = torch.empty(n, dtype=torch.float32)
    _tl_rand_per_row[(n,)](seed, offset, expected)
    got = philox_uniform(seed, offset)
    assert got.dtype == torch.float32
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))
    assert bool(((got >= 0) & (got < 1)).all())


def test_philox4x32_known_answer_vectors():
    # Known-answer vectors of Random123 (kat_vectors, philox4x32_10).
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for counter, key, expected in cases:
        got = philox4x32(tuple(torch.tensor([c]) for c in counter), tuple(torch.tensor([k]) for k in key))
        assert tuple(int(x) for x in got) == expected


def test_philox_uniform_is_uniform_and_depends_on_seed_and_offset():
    offset = torch.arange(100_000)
    u = philox_uniform(torch.full_like(offset, 7), offset).double()
    # mean and variance of U(0,1): 1/2 and 1/12; 6 standard errors of slack.
    assert abs(u.mean().item() - 0.5) < 6 * (1 / 12) ** 0.5 / 100_000**0.5
    assert abs(u.var().item() - 1 / 12) < 6 * 0.0745 / 100_000**0.5 + 1e-4
    counts = torch.histc(u, bins=10, min=0, max=1)
    assert bool((counts - 10_000).abs().max() < 600)  # ~6 sigma for binomial(1e5, 0.1)
    other_seed = philox_uniform(torch.full_like(offset, 8), offset)
    assert (other_seed.double() == u).float().mean() < 1e-3
