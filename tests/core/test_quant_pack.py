import pytest
import torch

from studio.core.errors import StudioError
from studio.core.quant.pack import pack_codes, packed_width, unpack_codes


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8])
@pytest.mark.parametrize("cols", [1, 7, 8, 33, 576])
def test_round_trip_is_exact(bits, dtype, cols):
    gen = torch.Generator().manual_seed(bits * 1000 + cols)
    codes = torch.randint(0, 2 ** bits, (5, cols), generator=gen).to(torch.uint8)
    codes[0] = 2 ** bits - 1   # all ones: the top bit of int32 words set
    codes[1] = 0
    packed = pack_codes(codes, bits, dtype)
    assert packed.dtype == dtype
    assert packed.shape == (5, packed_width(cols, bits, dtype))
    assert torch.equal(unpack_codes(packed, bits, cols), codes)


def test_four_bit_layout_matches_gptq_checkpoints():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8)
    word = pack_codes(codes, 4).item() & 0xFFFFFFFF
    assert word == 0x87654321  # lowest code in the lowest bits


def test_codes_too_wide_and_bad_widths_are_refused():
    with pytest.raises(StudioError):
        pack_codes(torch.tensor([[4]], dtype=torch.uint8), 2)
    with pytest.raises(StudioError):
        pack_codes(torch.zeros(1, 4, dtype=torch.uint8), 9)
    with pytest.raises(StudioError):
        unpack_codes(torch.zeros(1, 3, dtype=torch.int32), 4, 8)


@pytest.mark.parametrize("bits", [3, 5, 6, 7])
def test_odd_widths_are_one_little_endian_bit_stream_per_row(bits):
    # code j at bits [j*bits, (j+1)*bits) of the row's stream, built here with Python integers
    codes = torch.randint(0, 2 ** bits, (3, 21), generator=torch.Generator().manual_seed(bits),
                          dtype=torch.uint8)
    packed = pack_codes(codes, bits, torch.uint8)
    for row, words in zip(codes.tolist(), packed.tolist()):
        stream = sum(code << (bits * j) for j, code in enumerate(row))
        assert words == list(stream.to_bytes(len(words), "little"))
