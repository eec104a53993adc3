import pytest
import torch

from qat_plugin.encoding import Encoding


def test_asymmetric_grid_holds_zero_and_covers_range():
    enc = Encoding.from_min_max(torch.tensor(-0.7), torch.tensor(2.3), bitwidth=8, symmetric=False)
    assert float(enc.scale) == pytest.approx(3.0 / 255)
    assert int(enc.offset) == round(-0.7 / (3.0 / 255))
    # zero is exactly representable: q = -offset
    assert float(enc.quantize_dequantize(torch.zeros(1))) == 0.0
    assert float(enc.min) <= -0.7 + float(enc.scale) and float(enc.max) >= 2.3 - float(enc.scale)


def test_symmetric_grid_is_signed_with_fixed_offset():
    enc = Encoding.from_min_max(torch.tensor(-0.5), torch.tensor(1.27), bitwidth=8, symmetric=True)
    assert float(enc.scale) == pytest.approx(1.27 / 127)
    assert int(enc.offset) == -128
    assert int(enc.onnx_zero_point()) == 0
    assert float(enc.min) == pytest.approx(-128 * 1.27 / 127)


def test_range_is_widened_to_hold_zero():
    enc = Encoding.from_min_max(torch.tensor(1.0), torch.tensor(3.0), bitwidth=8, symmetric=False)
    assert int(enc.offset) == 0 and float(enc.min) == 0.0


def test_onnx_zero_point_asymmetric_is_minus_offset():
    enc = Encoding.from_min_max(torch.tensor(-1.0), torch.tensor(3.0), bitwidth=8, symmetric=False)
    assert int(enc.onnx_zero_point()) == 64 == -int(enc.offset)


def test_per_channel_quantize_dequantize_uses_axis():
    lo, hi = torch.tensor([-1.0, -2.0]), torch.tensor([1.0, 2.0])
    enc = Encoding.from_min_max(lo, hi, bitwidth=4, symmetric=True, axis=1)
    x = torch.tensor([[0.3, 0.3]], dtype=torch.float64)
    out = enc.quantize_dequantize(x)
    assert out[0, 0].item() == pytest.approx(round(0.3 / (1 / 7)) / 7)
    assert out[0, 1].item() == pytest.approx(round(0.3 / (2 / 7)) * 2 / 7)


@pytest.mark.parametrize("bad", [1, 17])
def test_bitwidth_out_of_range(bad):
    with pytest.raises(ValueError, match="bitwidth"):
        Encoding(torch.tensor(1.0), torch.tensor(0.0), bad, False)


def test_json_entries_per_channel():
    enc = Encoding.from_min_max(torch.tensor([-1.0, -2.0]), torch.tensor([1.0, 2.0]), 8, True, axis=0)
    entries = enc.to_json()
    assert len(entries) == 2 and entries[1]["scale"] == pytest.approx(2 / 127) and entries[0]["offset"] == -128


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bw", [4, 8, 16])
def test_range_round_trips_through_from_min_max(symmetric, bw):
    enc = Encoding.from_min_max(torch.tensor([-0.3, -2.0]), torch.tensor([1.7, 0.5]), bw, symmetric, axis=0)
    again = Encoding.from_min_max(*enc.range(), bw, symmetric, axis=0)
    assert torch.equal(again.offset, enc.offset)
    torch.testing.assert_close(again.scale, enc.scale, rtol=1e-14, atol=0)


def test_json_entry_holds_every_aimet_field():
    enc = Encoding.from_min_max(torch.tensor(-1.0), torch.tensor(3.0), bitwidth=8, symmetric=False)
    (entry,) = enc.to_json()
    assert entry == {"bitwidth": 8, "dtype": "int", "is_symmetric": "False", "max": float(enc.max),
                     "min": float(enc.min), "offset": -64, "scale": float(enc.scale)}
    assert isinstance(entry["offset"], int)
    sym = Encoding.from_min_max(torch.tensor([-1.0, -2.0]), torch.tensor([1.0, 2.0]), 4, True, axis=0).to_json()
    assert [e["is_symmetric"] for e in sym] == ["True", "True"] and [e["min"] for e in sym] == [-8 / 7, -16 / 7]


def test_to_cpu_keeps_the_grid():
    enc = Encoding.from_min_max(torch.tensor([-1.0, -2.0]), torch.tensor([1.0, 3.0]), 4, False, axis=1)
    cpu = enc.to_cpu()
    assert cpu is not enc and torch.equal(cpu.scale, enc.scale) and torch.equal(cpu.offset, enc.offset)
    assert (cpu.bitwidth, cpu.symmetric, cpu.axis) == (4, False, 1) and cpu.scale.device.type == "cpu"


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bw", [4, 8, 16])
def test_reference_quantize_dequantize_saturates_at_the_grid_ends(symmetric, bw):
    enc = Encoding.from_min_max(torch.tensor([-0.3, -2.0]), torch.tensor([1.7, 0.5]), bw, symmetric, axis=1)
    lo, hi = enc.min.reshape(1, 2), enc.max.reshape(1, 2)
    x = torch.cat([lo - 1e3, hi + 1e3, lo - 0.49 * enc.scale, hi + 0.49 * enc.scale, lo, hi]).double()
    out = enc.quantize_dequantize(x)
    assert torch.equal(out, torch.cat([lo, hi, lo, hi, lo, hi]))


def test_onnx_zero_point_is_int64():
    for symmetric in (False, True):
        enc = Encoding.from_min_max(torch.tensor([-1.0, -2.0]), torch.tensor([1.0, 3.0]), 8, symmetric, axis=0)
        zp = enc.onnx_zero_point()
        assert zp.dtype == torch.int64 and zp.shape == (2,)
        assert zp.tolist() == ([0, 0] if symmetric else [-int(o) for o in enc.offset])


@pytest.mark.parametrize("symmetric", [False, True])
def test_range_is_the_requested_range(symmetric):
    enc = Encoding.from_min_max(torch.tensor(-0.5), torch.tensor(1.27), 8, symmetric)
    lo, hi = enc.range()
    if symmetric:  # +-scale * 127
        assert float(lo) == -float(hi) and float(hi) == pytest.approx(float(torch.tensor(1.27)), rel=1e-12)
    else:  # the grid's ends
        assert float(lo) == float(enc.min) and float(hi) == float(enc.max)


@pytest.mark.parametrize("scale, offset, axis, message", [
    (torch.tensor(0.0), torch.tensor(0.0), None, "scale must be positive"),
    (torch.tensor([0.1, -0.1]), torch.tensor([0.0, 0.0]), 0, "scale must be positive"),
    (torch.tensor([0.1, 0.2]), torch.tensor(0.0), 0, "same shape"),
    (torch.tensor([0.1, 0.2]), torch.tensor([0.0, 0.0]), None, "pass axis for per-channel"),
])
def test_invalid_encodings_say_what_is_wrong(scale, offset, axis, message):
    with pytest.raises(ValueError, match=message):
        Encoding(scale, offset, 8, False, axis)


def test_degenerate_range_gets_the_floor_scale():
    enc = Encoding.from_min_max(torch.tensor(0.0), torch.tensor(0.0), 8, False)
    assert float(enc.scale) == torch.finfo(torch.float32).tiny * 2**10 and int(enc.offset) == 0
