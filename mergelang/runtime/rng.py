"""Counter-based random numbers: Philox4x32-10 (Salmon et al., SC'11) in plain torch int64 ops.

A random stream is keyed by a string (`seed`, tensor name, model index, stream name), hashed with
SHA-256 into a 64-bit Philox key and two counter words; element `e` of a tensor reads lane
`e % 4` of the block at counter `e // 4`. The numbers depend only on that key and the element
index, never on the device, on batching or on the order tensors are processed in, so a merge
with random sparsification is bit-identical on CPU and GPU, run after run.

Every product is computed from 16-bit halves so no intermediate leaves the int64 range (torch
does not promise wrap-around on signed overflow); `philox4x32` is checked against the Random123
known-answer vectors in the tests.
"""

from __future__ import annotations

import hashlib

import torch

M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
MASK32 = 0xFFFFFFFF
ROUNDS = 10
#: counters per chunk (4 lanes each): small on CPU so the int64 temporaries stay in cache,
#: large on GPU to amortise kernel launches
CHUNK = {"cpu": 1 << 15, "cuda": 1 << 22}


def _mulhilo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * b for a in [0, 2^32) (int64 tensor), b a 32-bit constant."""
    p_lo = (a & 0xFFFF) * b          # < 2^48
    p_hi = (a >> 16) * b             # < 2^48
    s = p_lo + ((p_hi & 0xFFFF) << 16)
    return (p_hi >> 16) + (s >> 32), s & MASK32


def philox4x32(ctr: list[torch.Tensor], key: tuple[int, int], rounds: int = ROUNDS
               ) -> list[torch.Tensor]:
    """Philox4x32-R on four int64 tensors of 32-bit counter words; returns four 32-bit words."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + W0) & MASK32, (k1 + W1) & MASK32
        hi0, lo0 = _mulhilo(c0, M0)
        hi1, lo1 = _mulhilo(c2, M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return [c0, c1, c2, c3]


def stream_key(*parts: object) -> tuple[tuple[int, int], tuple[int, int]]:
    """A stable (Philox key, counter high words) pair for a tuple of key parts."""
    text = "\x1f".join(str(p) for p in parts).encode("utf-8")
    h = hashlib.sha256(text).digest()
    w = [int.from_bytes(h[i:i + 4], "little") for i in range(0, 16, 4)]
    return (w[0], w[1]), (w[2], w[3])


def random_u32(numel: int, *key_parts: object, device: torch.device | str = "cpu",
               offset: int = 0) -> torch.Tensor:
    """`numel` uniform 32-bit integers (int64 tensor) of the stream named by `key_parts`:
    elements `offset .. offset + numel` (a row chunk reads its slice of the stream); element e
    depends only on the key and e."""
    key, (h2, h3) = stream_key(*key_parts)
    out = torch.empty(numel, dtype=torch.int64, device=device)
    end = offset + numel
    first, blocks = offset // 4, (end + 3) // 4
    chunk = CHUNK.get(torch.device(device).type, CHUNK["cuda"])
    for start in range(first, blocks, chunk):
        stop = min(blocks, start + chunk)
        j = torch.arange(start, stop, dtype=torch.int64, device=device)
        words = philox4x32([j & MASK32, j >> 32, torch.full_like(j, h2), torch.full_like(j, h3)],
                           key)
        lanes = torch.stack(words, dim=-1).reshape(-1)  # element 4j + lane
        lo, hi = max(start * 4, offset), min(stop * 4, end)
        out[lo - offset:hi - offset] = lanes[lo - start * 4:hi - start * 4]
    return out


def bernoulli_mask(p: torch.Tensor, shape: tuple[int, ...], *key_parts: object,
                   offset: int = 0) -> torch.Tensor:
    """True with probability p (broadcast to `shape`): u32 < p * 2^32, compared exactly in float64.
    `offset`: the flat index of the first element in the whole tensor (row chunks)."""
    n = 1
    for d in shape:
        n *= d
    u = random_u32(n, *key_parts, device=p.device, offset=offset).reshape(shape)
    thr = p.to(torch.float64) * 4294967296.0
    return u.to(torch.float64) < thr
