import pytest
import torch

from qat_plugin import NotCalibratedError, QuantizeDequantize
from qat_plugin.encoding import Encoding


def reference(x, scale, offset, bw):
    """float64 fake-quant with ONNX QuantizeLinear's semantics: the quotient ``x / scale`` is a
    float32 division (as in ONNX Runtime), rounded half to even; the rest is float64."""
    quotient = (x.float() / scale.float()).double()
    q = torch.clamp(torch.round(quotient) - offset.double(), 0, 2**bw - 1)
    return (q + offset.double()) * scale.double()


def make(bw, symmetric, lo=-1.5, hi=2.5, axis=None, channels=0, learnable=False):
    shape = (channels,) if axis is not None else ()
    q = QuantizeDequantize(shape, bw, symmetric, axis, learnable=learnable, name="t")
    lo_t, hi_t = torch.full(shape, lo), torch.full(shape, hi)
    if axis is not None:
        hi_t = hi_t * torch.arange(1, channels + 1)
    q.set_encoding(Encoding.from_min_max(lo_t, hi_t, bw, symmetric, axis))
    return q


@pytest.mark.parametrize("bw", [2, 4, 8, 12, 16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_forward_matches_float64_reference(bw, symmetric):
    q = make(bw, symmetric)
    x = torch.randn(4096) * 2
    enc = q.encoding
    expected = reference(x, enc.scale, enc.offset, bw)
    # float32 math: equal to float64 up to one rounding of the final product
    torch.testing.assert_close(q(x).double(), expected, atol=float(enc.scale) * 1e-5, rtol=1e-6)


def test_per_channel_forward():
    q = make(8, True, axis=1, channels=3)
    x = torch.randn(5, 3, 4) * 3
    enc = q.encoding
    expected = reference(x, enc.scale.reshape(1, 3, 1), enc.offset.reshape(1, 3, 1), 8)
    torch.testing.assert_close(q(x).double(), expected, atol=1e-6, rtol=1e-6)


def test_ste_gradients_match_lsq_reference():
    q = make(4, False, learnable=True)
    x = torch.tensor([-3.0, -0.61, 0.0, 0.37, 1.9, 9.0], requires_grad=True)
    q(x).sum().backward()
    g = (6 * 15) ** -0.5  # LSQ gradient scale: 1 / sqrt(values per scale * levels)
    s, o = float(q.scale.detach()), float(torch.round(q.offset.detach()))
    lo, hi = o * s, (o + 15) * s
    # inside: rounded onto the grid, not clipped (within half a step of its ends)
    inside = [(lo - s / 2 < v.item() < hi + s / 2) for v in x.detach()]
    # input gradient: 1 inside the range, 0 outside
    assert x.grad.tolist() == [1.0 if i else 0.0 for i in inside]
    # scale gradient (LSQ): round(x/s) - x/s inside; clip level (o or o+15) outside
    exp_s = 0.0
    exp_o = 0.0
    for v, i in zip(x.detach().double().tolist(), inside):
        if i:
            exp_s += round(v / s) - v / s
        else:
            exp_s += (o if v < lo else o + 15)
            exp_o += s
    assert q.scale.grad.item() == pytest.approx(g * exp_s, abs=1e-4)
    assert q.offset.grad.item() == pytest.approx(g * exp_o, abs=1e-5)


def test_learned_scale_stays_positive():
    q = make(8, False, learnable=True)
    with torch.no_grad():
        q.scale.mul_(-1)  # an optimizer overshot through zero
    assert float(q.encoding.scale) > 0
    x = torch.randn(100)
    torch.testing.assert_close(q(x), make(8, False)(x))


def test_symmetric_offset_is_not_learnable():
    q = make(8, True, learnable=True)
    assert q.scale.requires_grad and not q.offset.requires_grad


def test_freeze_stops_range_learning():
    q = make(8, False, learnable=True)
    q.freeze()
    assert not q.scale.requires_grad and not q.offset.requires_grad
    q.unfreeze()
    assert q.scale.requires_grad and q.offset.requires_grad


@pytest.mark.parametrize("axis", [None, 1])
def test_freeze_after_learning_keeps_the_learned_grid(axis):
    """Offsets and scales an optimizer moved (even through zero) are what the frozen quantizer
    uses: the fixed-grid path must not fall back to the calibrated offset."""
    from qat_plugin.quantizer import fake_quantize

    q = make(8, False, axis=axis, channels=3 if axis else 0, learnable=True)
    with torch.no_grad():
        q.offset.add_(-7.3)
        q.scale.mul_(-1.1)  # an optimizer pushed the scale through zero: the grid uses |scale|
    x = torch.randn(4, 3, 5, 5) * 2
    learned = q(x).detach()
    enc = q.encoding
    q.freeze()
    assert not q.learnable and q.encoding.scale.equal(enc.scale) and q.encoding.offset.equal(enc.offset)
    shape = (1, 3, 1, 1) if axis else ()
    ref = fake_quantize(x, enc.scale.float().reshape(shape), enc.offset.float().reshape(shape), 8)
    torch.testing.assert_close(q(x), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(learned, ref, rtol=0, atol=1e-6)


def test_uncalibrated_forward_raises():
    q = QuantizeDequantize(name="layer.output")
    with pytest.raises(NotCalibratedError, match=r"quantizer 'layer.output' has no encoding.*compute_encodings"):
        q(torch.zeros(3))


def test_disabled_is_identity():
    q = make(2, False)
    q.enabled = False
    x = torch.randn(10)
    assert torch.equal(q(x), x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_math_is_float32_under_autocast(dtype):
    q8, q16 = make(8, False), make(16, False, lo=-300.0, hi=300.0)
    x = (torch.randn(1000) * 100)
    with torch.autocast("cpu", dtype=dtype):
        out8 = q8(x.to(dtype))
        out16 = q16(x.to(dtype))
    assert out8.dtype == dtype  # 8-bit grids go back to the input dtype
    assert out16.dtype == torch.float32  # a 16-bit grid never passes through 16-bit floats
    assert make(9, False)(x.to(dtype)).dtype == torch.float32  # nor does any grid wider than 8 bits
    enc = q16.encoding
    expected = reference(x.to(dtype).float(), enc.scale, enc.offset, 16)
    torch.testing.assert_close(out16.double(), expected, atol=float(enc.scale) * 1e-3, rtol=2e-7)


def test_state_dict_round_trip_restores_encoding():
    q = make(6, False, learnable=True)
    fresh = QuantizeDequantize((), 6, False, None, learnable=True)
    fresh.load_state_dict(q.state_dict())
    assert fresh.is_initialized()
    x = torch.randn(100)
    assert torch.equal(fresh(x), q(x))


def test_set_encoding_rejects_mismatch():
    q = QuantizeDequantize((), 8, False)
    with pytest.raises(ValueError, match="does not match"):
        q.set_encoding(Encoding.from_min_max(torch.tensor(-1.0), torch.tensor(1.0), 4, False))
    pc = QuantizeDequantize((2,), 8, False, axis=0, name="conv.weight")
    two = Encoding.from_min_max(torch.tensor([-1.0, -2.0]), torch.tensor([1.0, 2.0]), 8, False, axis=1)
    with pytest.raises(ValueError, match=r"conv.weight: encoding \(8-bit, symmetric=False, axis=1\) does not match"):
        pc.set_encoding(two)  # same bitwidth and symmetry, other axis
    three = Encoding.from_min_max(-torch.ones(3), torch.ones(3), 8, False, axis=0)
    with pytest.raises(ValueError, match=r"conv.weight: encoding shape \(3,\) != \(2,\)"):
        pc.set_encoding(three)


def test_defaults_are_an_uncalibrated_8_bit_asymmetric_per_tensor_grid():
    q = QuantizeDequantize()
    assert (q.bitwidth, q.symmetric, q.axis, q.name, q.learnable) == (8, False, None, "", False)
    assert q.is_initialized() is False and q.state_dict()["initialized"].item() is False
    with pytest.raises(ValueError, match="per-channel quantizers need both a non-scalar shape and an axis"):
        QuantizeDequantize((3,), 8)

@pytest.mark.parametrize("bad", [1, 17, 8.0])
def test_bad_bitwidth(bad):
    with pytest.raises(ValueError, match="bitwidth"):
        QuantizeDequantize(bitwidth=bad)


@pytest.mark.parametrize("axis, symmetric", [(None, False), (None, True), (1, False), (1, True)])
@pytest.mark.parametrize("learnable", [False, True])
def test_fast_paths_match_the_autograd_reference(axis, symmetric, learnable):
    """The quantizer's hand-written gradients equal autograd through :func:`fake_quantize`."""
    from qat_plugin.quantizer import fake_quantize

    q = make(6, symmetric, lo=-0.8, hi=1.1, axis=axis, channels=3 if axis else 0, learnable=learnable)
    x = (torch.randn(4, 3, 5, 5) * 1.5).requires_grad_()
    gout = torch.randn(4, 3, 5, 5)
    (q(x) * gout).sum().backward()
    shape = (1, 3, 1, 1) if axis else ()
    s = q.scale.detach().clone().reshape(shape).requires_grad_()
    o = q.offset.detach().clone().reshape(shape).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    factor = (x.numel() / q.scale.numel() * 63) ** -0.5 if learnable else 1.0
    out = fake_quantize(xr, s, o, 6, factor)
    (out * gout).sum().backward()
    torch.testing.assert_close(q(x).detach(), out.detach())
    torch.testing.assert_close(x.grad, xr.grad)
    if learnable:
        torch.testing.assert_close(q.scale.grad, s.grad.reshape(q.scale.shape), rtol=1e-4, atol=1e-6)
        if not symmetric:
            torch.testing.assert_close(q.offset.grad, o.grad.reshape(q.offset.shape), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("learnable", [False, True])
def test_values_rounded_onto_the_grid_ends_keep_their_gradient(learnable):
    """Post-ReLU zeros sit on the lowest level: they are rounded, not clipped."""
    q = make(8, False, lo=0.0, hi=2.0, learnable=learnable)
    s = float(q.scale.detach())
    x = torch.tensor([0.0, -0.4 * s, -0.6 * s, 2.0, 2.0 + 0.4 * s, 2.0 + 0.6 * s], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("learnable", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gradient_mask_edges_on_a_power_of_two_grid(symmetric, learnable):
    """Exact quotients: the input gradient is 1 strictly inside half a step of the grid's ends
    and 0 from exactly half a step out (the lowest level of a symmetric grid included), in the
    module's fast paths and in the autograd reference alike."""
    from qat_plugin.quantizer import fake_quantize

    off = -8.0 if symmetric else -3.0
    q = QuantizeDequantize((), 4, symmetric, learnable=learnable)
    q.set_encoding(Encoding(torch.tensor(0.25, dtype=torch.float64), torch.tensor(off, dtype=torch.float64), 4, symmetric))
    lo, hi = off, off + 15  # grid ends in steps
    steps = torch.tensor([lo - 0.5, lo - 0.25, lo, lo + 0.5, hi - 0.5, hi, hi + 0.25, hi + 0.5])
    x = (steps * 0.25).requires_grad_()
    q(x).sum().backward()
    expected = [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    assert x.grad.tolist() == expected
    xr = (steps * 0.25).requires_grad_()
    fake_quantize(xr, torch.tensor(0.25), torch.tensor(off), 4).sum().backward()
    assert xr.grad.tolist() == expected


def test_reference_grad_factor_scales_a_learned_scale_with_a_fixed_offset():
    """``fake_quantize``'s ``grad_factor`` applies when only the scale learns (symmetric grids)."""
    from qat_plugin.quantizer import fake_quantize

    x = torch.tensor([-0.3, 0.11, 0.52, 2.0])
    grads = []
    for factor in (1.0, 0.25):
        s = torch.tensor(0.1, requires_grad=True)
        fake_quantize(x, s, torch.tensor(-8.0), 4, factor).sum().backward()
        grads.append(float(s.grad))
    assert grads[1] == pytest.approx(0.25 * grads[0]) and grads[0] != 0
    s = torch.tensor(0.1, requires_grad=True)
    fake_quantize(x, s, torch.tensor(-8.0), 4).sum().backward()  # the default factor is 1
    assert float(s.grad) == grads[0]


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("shape, axis", [((7,), 0), ((1, 6), 0), ((2, 5), 0), ((2, 1, 3), 1), ((4, 3, 5), 1)])
def test_per_channel_gradients_equal_per_tensor_gradients_per_channel(shape, axis, symmetric):
    """LSQ range gradients of a per-channel quantizer are those of one per-tensor quantizer per
    channel (same values per scale, so the same gradient factor), for 1-D inputs and single
    channels too."""
    channels = shape[axis]
    lo, hi = -torch.rand(channels, dtype=torch.float64) - 0.2, torch.rand(channels, dtype=torch.float64) + 0.3
    pc = QuantizeDequantize((channels,), 4, symmetric, axis, learnable=True)
    pc.set_encoding(Encoding.from_min_max(lo, hi, 4, symmetric, axis))
    x = torch.randn(shape) * 0.8
    g = torch.randn(shape)
    (pc(x) * g).sum().backward()
    for c in range(channels):
        pt = QuantizeDequantize((), 4, symmetric, learnable=True)
        pt.set_encoding(Encoding.from_min_max(lo[c], hi[c], 4, symmetric))
        xc = x.select(axis, c).clone()
        (pt(xc) * g.select(axis, c)).sum().backward()
        torch.testing.assert_close(pc.scale.grad[c], pt.scale.grad, rtol=1e-5, atol=1e-7)
        if not symmetric:
            torch.testing.assert_close(pc.offset.grad[c], pt.offset.grad, rtol=1e-5, atol=1e-7)


def test_calibration_and_monitoring_hand_back_their_observer():
    from qat_plugin.calibration import MinMaxObserver

    q = make(8, False)
    obs, mon = MinMaxObserver(), MinMaxObserver()
    q.start_calibration(obs)
    x = torch.tensor([-3.0, 5.0])
    assert torch.equal(q(x), x)  # observed, passed through unchanged
    assert q.stop_calibration() is obs and q.stop_calibration() is None
    assert obs.min.tolist() == [-3.0] or float(obs.min) == -3.0
    q.start_monitoring(mon)
    assert not torch.equal(q(x), x)  # monitored while quantizing
    assert q.stop_monitoring() is mon and q.stop_monitoring() is None
    assert float(mon.max) == 5.0


def test_repr_names_the_grid():
    q = make(4, True, axis=0, channels=2, learnable=True)
    assert q.extra_repr() == "bitwidth=4, symmetric, per-channel(axis=0), learnable=True"
    q = make(8, False)
    q.enabled = False
    assert q.extra_repr() == "bitwidth=8, asymmetric, per-tensor, learnable=False, disabled"


def test_lsq_range_gradient_of_activations_does_not_depend_on_the_batch_size():
    """Per-sample counting (LSQ's N_F for activations): the gradient of a mean loss over one batch
    of 8 equals the mean of the gradients over its two halves, as DDP's averaging computes it."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 5, 5)

    def grad(batch, per_sample):
        q = QuantizeDequantize((), 8, False, None, learnable=True, per_sample=per_sample)
        q.set_encoding(Encoding.from_min_max(torch.tensor(-1.5), torch.tensor(1.0), 8, False))
        q(batch).pow(2).mean().backward()
        return q.scale.grad.clone()

    halves = (grad(x[:4], True) + grad(x[4:], True)) / 2
    torch.testing.assert_close(grad(x, True), halves, rtol=1e-5, atol=0)
    assert not torch.allclose(grad(x, False), (grad(x[:4], False) + grad(x[4:], False)) / 2, rtol=1e-3)
