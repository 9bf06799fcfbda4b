"""The format vocabulary: parsing, canonical names, byte accounting."""

from __future__ import annotations

import pytest

from quantcal.errors import QuantcalError
from quantcal.formats import (
    FP16, W8A8, Int4, Int8, parse_format, parse_formats, shares_tied_weight,
)


@pytest.mark.parametrize("text, fmt", [
    ("fp16", FP16()), ("int8", Int8(128)), ("int8-g32", Int8(32)), ("w8a8", W8A8()),
    ("int4-g32", Int4(32)), ("int4-g64", Int4(64)), ("INT4-G128", Int4(128)),
    ("int4-g128-sym", Int4(128, symmetric=True)),
])
def test_parse_and_canonical_name(text, fmt):
    parsed = parse_format(text)
    assert parsed == fmt and type(parsed) is type(fmt)
    assert parse_format(parsed.name) == parsed


@pytest.mark.parametrize("bad", ["int3", "int4", "int4-g48", "fp8", "w8a8-g32", "", "int8-g7"])
def test_unknown_format_is_a_clear_error(bad):
    with pytest.raises(QuantcalError) as exc:
        parse_format(bad)
    assert "int4" in str(exc.value) or "group size" in str(exc.value)


def test_parse_formats_list():
    assert parse_formats("int8, int4-g128") == (Int8(), Int4(128))
    with pytest.raises(QuantcalError):
        parse_formats(" , ")


def test_weight_bytes_match_matmulnbits_layout():
    n, k = 576, 1536
    assert FP16().weight_bytes(n, k) == 2 * n * k
    # int4 g128 asym: 64 code bytes + 2 scale bytes per block + packed zero points
    blocks = k // 128
    assert Int4(128).weight_bytes(n, k) == n * (blocks * 64 + blocks * 2 + blocks // 2)
    assert Int4(128, symmetric=True).weight_bytes(n, k) == n * (blocks * 66)
    assert Int8().weight_bytes(n, k) == n * (blocks * 128 + blocks * 2 + blocks)
    assert 4.0 < Int4(128).bits_per_weight(n, k) < 4.2
    assert Int4(32).bits_per_weight(n, k) > Int4(128).bits_per_weight(n, k)


def test_formats_are_hashable_and_dispatchable():
    table = {Int4: "nbits", Int8: "nbits", FP16: "matmul", W8A8: "qdq"}
    assert [table[type(parse_format(s))] for s in ("int4-g32", "fp16", "w8a8")] == \
        ["nbits", "matmul", "qdq"]
    assert len({Int4(32), Int4(32), Int4(64)}) == 2


def test_embedding_bytes_and_tied_sharing():
    v, h = 1000, 576  # SmolLM2's hidden size: 18 blocks of 32, 9 of 64, 5 (padded) of 128
    assert FP16().embedding_bytes(v, h) == 2 * v * h
    assert Int4(32).embedding_bytes(v, h) == Int4(32).weight_bytes(v, h)
    # an odd number of asymmetric 4-bit blocks is padded to an even one
    assert Int4(64).gather_blocks(h) == 10 and Int4(64, symmetric=True).gather_blocks(h) == 9
    assert Int4(64).embedding_bytes(v, h) == Int4(64).weight_bytes(v, 640)
    assert Int8().gather_blocks(h) == 5  # 8-bit zero points are one byte each
    assert shares_tied_weight(FP16(), FP16(), h)
    assert shares_tied_weight(Int4(32), Int4(32), h)
    assert shares_tied_weight(Int8(), Int8(), h)
    assert shares_tied_weight(Int4(64, symmetric=True), Int4(64, symmetric=True), h)
    assert not shares_tied_weight(Int4(64), Int4(64), h)  # padded table: stored twice
    assert not shares_tied_weight(Int4(32), FP16(), h)
    assert not shares_tied_weight(Int4(32), Int4(32, symmetric=True), h)
