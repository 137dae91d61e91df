"""Random inputs that are the same on every machine.

torch's ``randn`` is not: its vectorised normal sampler differs by ISA level (a float32 draw
under ``ATEN_CPU_CAPABILITY=default`` differs from one under avx2), and the float64 path calls
the platform's libm. Here the bits come from Python's Mersenne Twister (``random.Random``,
reproducible across platforms and Python versions for an integer seed), uniforms are exact
53-bit fractions, and normals come from the Box-Muller transform computed with reference.fp's
deterministic float64 ``log``, ``sqrt`` (IEEE-exact) and ``cos``. A case's seed is derived
from its name (``seed_from_name``), so cases are independent and renaming one re-draws it.
"""

from __future__ import annotations

import hashlib
import math
import random

import numpy as np
import torch

from reference import fp

_TWO53 = float(2 ** 53)
FP8_TIES = 12  # rounding ties planted in each fp8 case's new K, new V or new latent


def seed_from_name(name: str) -> int:
    """The first 4 bytes of sha256(name), as an integer (what the manifest records)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")


class Draws:
    """A deterministic stream of draws for one case (the stored tiers' inputs), on the CPU."""

    device = torch.device("cpu")

    def __init__(self, seed: int):
        self._rng = random.Random(int(seed))

    def _bits53(self, n: int) -> torch.Tensor:
        raw = np.frombuffer(self._rng.randbytes(8 * n), dtype="<u8") >> np.uint64(11)
        return torch.from_numpy(raw.astype(np.int64))

    def uniform(self, shape) -> torch.Tensor:
        """float64 in [0, 1): k / 2**53."""
        n = math.prod(shape)
        return (self._bits53(n).to(torch.float64) / _TWO53).reshape(shape)

    def normal(self, shape, std: float = 1.0) -> torch.Tensor:
        """float64 N(0, std**2): sqrt(-2 log u1) cos(2 pi u2), u1 in (0, 1]."""
        n = math.prod(shape)
        u1 = (self._bits53(n).to(torch.float64) + 1.0) / _TWO53
        u2 = self._bits53(n).to(torch.float64) / _TWO53
        z = torch.sqrt(-2.0 * fp.log(u1)) * fp.cos_2pi(u2)
        return (z * std).reshape(shape)

    def permutation(self, n: int) -> torch.Tensor:
        """int64: a random permutation of range(n) (the order of n 53-bit keys)."""
        return torch.sort(self._bits53(n), stable=True).indices  # a tie keeps the index order

    def signs(self, shape) -> torch.Tensor:
        """float64 +-1."""
        return torch.where(self._bits53(math.prod(shape)).reshape(shape) % 2 == 0, 1.0, -1.0).to(torch.float64)

    def fp8_ties(self, n: int, fp8_dtype: torch.dtype, scale: float) -> torch.Tensor:
        """n float64 values x with x / scale exactly half-way between two fp8 values whose lower
        neighbour (in magnitude) has an even mantissa: round-to-nearest-even stores the lower
        one, round-half-away the upper one. Codes 0x28..0x4f: normal values 0.25..7.5 (e4m3fn)."""
        codes = 0x28 + 2 * (self.uniform((n,)) * 20).to(torch.int64)  # even codes: mantissa LSB 0
        lo = codes.to(torch.uint8).view(fp8_dtype).to(torch.float64)
        hi = (codes + 1).to(torch.uint8).view(fp8_dtype).to(torch.float64)
        return self.signs((n,)) * (lo + hi) * 0.5 * scale

    def fp8_specials(self, x: torch.Tensor, fp8_dtype: torch.dtype, model_dtype: torch.dtype, scale: float,
                     last_token: int, saturating: int, ties: int = FP8_TIES) -> torch.Tensor:
        """New tokens [T, ...] for an fp8 cache (model-dtype values, float64) with ``ties``
        rounding ties at random positions and, in each row of token ``last_token``'s trailing
        dims, ``saturating`` values beyond the fp8 range (|x| / scale in (1.06, 1.44) * max, both
        signs). ``last_token`` should be a sequence's last new token: under causal masking only
        its own query row sees it, so the pipelines' difference stays in that row."""
        fmt8, m = fp.format_of(fp8_dtype), fp.format_of(model_dtype)
        x = x.to(torch.float64).clone()
        flat = x.reshape(-1)
        flat[(self.uniform((ties,)) * flat.numel()).to(torch.int64)] = self.fp8_ties(ties, fp8_dtype, scale)
        row = x[last_token].reshape(-1, x[last_token].shape[-1])  # a view: [rows, last dim]
        for r in range(row.shape[0]):
            cols = (self.uniform((saturating,)) * row.shape[1]).to(torch.int64)
            over = fp.round_to(fmt8.max_finite * scale * (1.0625 + 0.375 * self.uniform((saturating,))), m)
            row[r, cols] = over * torch.tensor([(-1.0) ** i for i in range(saturating)], dtype=torch.float64,
                                               device=x.device)
        if not bool((fp.round_to(x, m) == x).all()):
            raise AssertionError(f"a planted fp8 value is not a {model_dtype} value; pick another scale")
        return x


# ---- live cases: the same draws computed on any device -----------------------------------------

_M32 = 0xFFFFFFFF
_CHUNK = 1 << 24  # counters hashed per step: bounds the int64 temporaries (128 MB each)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32): c split in 16-bit halves, so no product
    exceeds 2**48 and nothing depends on how a device wraps an int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (C. Wellons' "lowbias32"; full avalanche), int64 in and out."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


class CounterDraws(Draws):
    """Draws for live cases (the large and sweep tiers), computed where they are used.

    Mersenne Twister is sequential and runs in Python: a large case's 270 million normals took
    over 90 s on the CPU, more than everything else a check does. Here draw number i of the
    case is a hash of (i, the seed's keys) made of exact int64 operations (xor, shifts, and
    products below 2**48), so the bits are the same on every device and CPU, and the
    float64 transforms above them (reference.fp) are exact IEEE operations too: a live case is
    the same tensors on a GPU and on any CPU (tests/test_draws.py checks both against a pure-Python
    hash; the GPU run compares devices). The stored tiers keep ``Draws`` (their files hold
    the inputs, and ``golden regen --check`` redraws them).
    """

    def __init__(self, seed: int, device="cpu"):
        self._keys = counter_keys(seed)
        self._next = 0  # counters used so far
        self.device = torch.device(device)

    def _bits53(self, n: int) -> torch.Tensor:
        k1, k2, k3, k4 = self._keys
        parts = []
        for start in range(self._next, self._next + n, _CHUNK):
            i = torch.arange(start, min(start + _CHUNK, self._next + n), dtype=torch.int64, device=self.device)
            lo, hi = i & _M32, i >> 32
            a = _mix32(_mix32(lo ^ k1) ^ hi ^ k2)
            b = _mix32(_mix32(lo ^ k3) ^ hi ^ k4)
            parts.append(((a >> 6) << 27) | (b >> 5))  # 26 + 27 bits
        self._next += n
        if not parts:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def counter_keys(seed: int) -> tuple:
    """The four 32-bit hash keys of a seed's counter stream."""
    digest = hashlib.sha256(f"attncheck-counter-draws:{int(seed)}".encode()).digest()
    return tuple(int.from_bytes(digest[4 * i:4 * i + 4], "big") for i in range(4))


def counter_bits53_python(seed: int, index: int) -> int:
    """Draw ``index`` of ``CounterDraws(seed)`` in plain Python integers (what tests compare the
    tensor code on each device against)."""
    k1, k2, k3, k4 = counter_keys(seed)

    def mix(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & _M32
        x ^= x >> 15
        x = (x * 0x846CA68B) & _M32
        return x ^ (x >> 16)

    lo, hi = index & _M32, index >> 32
    a, b = mix(mix(lo ^ k1) ^ hi ^ k2), mix(mix(lo ^ k3) ^ hi ^ k4)
    return ((a >> 6) << 27) | (b >> 5)
