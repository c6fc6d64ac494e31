"""Bit packing of integer codes into bytes (numpy, vectorised).

  ternary : 5 trits per byte, base 3 (3^5 = 243 ≤ 256) -> 1.6 bits/weight, 20x smaller than fp32
            byte = d0 + 3 d1 + 9 d2 + 27 d3 + 81 d4 with d = code + 1, the first code in the lowest digit
  1 bit   : 8 codes per byte, bit i of a byte = code i > 0 (little-endian bit order)
  k bits  : 8 / k codes per byte (2 bits: 4, 4 bits: 2, 8 bits: 1), offset binary u = code + 2^(k-1),
            the first code in the lowest bits
The codes are flattened in row-major order; the last byte is padded (with code 0, or -1 at 1 bit), so packed length
is ceil(numel / codes_per_byte) and `unpack_codes` needs `numel` back.
"""
from __future__ import annotations

import math

import numpy as np

from hybrid_optimization.quantization.quantizers import TERNARY_BITS, code_range, normalize_bits

_TRIT_POWERS = np.array([1, 3, 9, 27, 81], dtype=np.uint8)
# Byte value -> its 5 codes; built once (243 x 5), unpacking is then one fancy-indexing gather.
_TRIT_TABLE = ((np.arange(243)[:, None] // _TRIT_POWERS.astype(np.int64)[None, :]) % 3 - 1).astype(np.int8)


def codes_per_byte(bits) -> int:
    b = normalize_bits(bits)
    if b == TERNARY_BITS:
        return 5
    if b >= 16:
        raise ValueError(f"bits={b:g} is full precision: there are no codes to pack")
    return 8 // int(b)


def packed_size(numel: int, bits) -> int:
    """Bytes that `pack_codes` produces for `numel` codes."""
    return math.ceil(int(numel) / codes_per_byte(bits))


def pack_codes(codes, bits) -> np.ndarray:
    """Pack int8 codes (numpy array or torch tensor, any shape) into a flat uint8 array."""
    b = normalize_bits(bits)
    flat = _as_int_array(codes).reshape(-1)
    lo, hi = code_range(b)
    if flat.size and (flat.min() < lo or flat.max() > hi or (b == 1 and (flat == 0).any())):
        allowed = "{-1, +1}" if b == 1 else f"integers in [{lo}, {hi}]"
        raise ValueError(f"codes outside the {b:g}-bit code set: found values in [{int(flat.min())}, "
                         f"{int(flat.max())}], allowed {allowed}")
    per_byte = codes_per_byte(b)
    if b == 1:
        return np.packbits(flat > 0, bitorder="little")
    pad = (-flat.size) % per_byte
    if b == TERNARY_BITS:
        digits = np.concatenate([flat, np.zeros(pad, dtype=flat.dtype)]).astype(np.uint8) + np.uint8(1)
        # Sum of at most 2*(1+3+9+27+81) = 242: fits in uint8 without overflow.
        return (digits.reshape(-1, 5) * _TRIT_POWERS).sum(axis=1, dtype=np.uint8)
    k = int(b)
    offset = 2 ** (k - 1)
    unsigned = (np.concatenate([flat, np.zeros(pad, dtype=flat.dtype)]).astype(np.int16) + offset).astype(np.uint8)
    if k == 8:
        return unsigned
    shifts = (np.arange(per_byte, dtype=np.uint8) * k)
    return np.bitwise_or.reduce(unsigned.reshape(-1, per_byte) << shifts, axis=1).astype(np.uint8)


def unpack_codes(packed, bits, numel: int) -> np.ndarray:
    """Inverse of `pack_codes`: a flat int8 array of `numel` codes. Wrong sizes or invalid bytes raise ValueError."""
    b = normalize_bits(bits)
    data = np.asarray(packed.numpy() if hasattr(packed, "numpy") else packed)
    if data.dtype != np.uint8:
        raise ValueError(f"packed codes must be uint8 bytes, got dtype {data.dtype}")
    data = data.reshape(-1)
    expected = packed_size(numel, b)
    if data.size != expected:
        raise ValueError(f"packed {b:g}-bit codes have {data.size} bytes but {numel} codes need {expected}")
    if b == 1:
        bits_ = np.unpackbits(data, count=int(numel), bitorder="little")
        return (bits_.astype(np.int8) * 2 - 1).astype(np.int8)
    if b == TERNARY_BITS:
        if data.size and data.max() > 242:
            raise ValueError(f"corrupt ternary packing: byte value {int(data.max())} > 242 (3^5 - 1)")
        return _TRIT_TABLE[data].reshape(-1)[:numel].copy()
    k = int(b)
    offset = 2 ** (k - 1)
    if k == 8:
        return (data.astype(np.int16) - offset).astype(np.int8)
    per_byte = 8 // k
    shifts = (np.arange(per_byte, dtype=np.uint8) * k)
    unsigned = (data[:, None] >> shifts) & np.uint8(2 ** k - 1)
    return (unsigned.reshape(-1)[:numel].astype(np.int16) - offset).astype(np.int8)


def _as_int_array(codes) -> np.ndarray:
    if hasattr(codes, "detach"):
        codes = codes.detach().cpu().numpy()
    array = np.asarray(codes)
    if array.dtype.kind not in "iu":
        raise ValueError(f"codes must be an integer array (int8), got dtype {array.dtype}")
    return array
