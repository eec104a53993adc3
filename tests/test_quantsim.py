"""QuantSimModel as a user sees it: modes, state_dict, the table, errors, nothing half-changed."""
import copy

import pytest
import torch
from torch import nn

from qat_plugin import (CalibrationError, NotCalibratedError, QuantConfigError, QuantSimModel,
                        UnsupportedModelError)
from helpers import calibrate, randomize_bn


def small():
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
                                      nn.Flatten(), nn.Linear(8 * 6 * 6, 4))).eval()


X = torch.randn(4, 3, 8, 8)


def test_user_model_is_never_modified():
    model = small()
    before = copy.deepcopy(model.state_dict())
    sim = calibrate(QuantSimModel(model, X), X)
    sim.model.train()
    sim.model(X).sum().backward()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model[1], nn.BatchNorm2d) and type(model[0]) is nn.Conv2d
    assert not model.training


def test_in_place_folds_into_the_user_model():
    model = small()
    sim = QuantSimModel(model, X, in_place=True)
    assert sim.model.get_submodule("0").weight is model[0].weight  # shared parameters


def test_train_and_eval_modes_are_respected():
    sim = calibrate(QuantSimModel(small(), X), X)
    sim.model.train()
    assert sim.model.get_submodule("3").training
    a, b = sim.model(X), sim.model(X)
    assert not torch.equal(a, b)  # dropout active
    sim.model.eval()
    assert torch.equal(sim.model(X), sim.model(X))


def test_state_dict_round_trips_into_a_fresh_sim():
    sim = calibrate(QuantSimModel(small(), X, quant_scheme="tf"), X)
    fresh = QuantSimModel(small(), X)
    with pytest.raises(NotCalibratedError):
        fresh.model(X)
    fresh.model.load_state_dict(sim.model.state_dict())
    sim.model.eval(); fresh.model.eval()
    assert torch.equal(fresh.model(X), sim.model(X))
    assert any(k.endswith("param_quantizers.weight.scale") for k in sim.model.state_dict())


def test_forward_before_calibration_says_what_to_do():
    sim = QuantSimModel(small(), X)
    with pytest.raises(NotCalibratedError, match="compute_encodings"):
        sim.model(X)


def test_table_lists_every_site_with_numbers():
    sim = calibrate(QuantSimModel(small(), X, quant_scheme="percentile"), X)
    text = str(sim)
    lines = text.splitlines()
    assert "5 quantizers" in lines[0] and "1 BatchNorms folded" in lines[0]
    assert len(lines) == 3 + 5  # header, column names, rule, 5 sites
    assert "Conv+BatchNormalization+Relu" in text and "8@0" in text and "-128..-128" in text
    assert "scale" in lines[1] and "offset" in lines[1] and "min" in lines[1]


def test_nan_in_calibration_names_the_site_and_changes_nothing():
    sim = calibrate(QuantSimModel(small(), X), X)
    before = {k: q.encoding for k, q in sim.quantizers().items()}
    bad = X.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(CalibrationError, match="input_1_input"):
        calibrate(sim, X * 5, bad)
    after = {k: q.encoding for k, q in sim.quantizers().items()}
    for k in before:
        assert torch.equal(before[k].scale, after[k].scale) and torch.equal(before[k].offset, after[k].offset)


def test_failing_callback_leaves_sim_uncalibrated():
    sim = QuantSimModel(small(), X)

    def boom(model, _):
        model(X)
        raise RuntimeError("data loader broke")

    with pytest.raises(RuntimeError, match="data loader broke"):
        sim.compute_encodings(boom)
    assert not any(q.is_initialized() for q in sim.quantizers().values())


def test_disabled_activation_quantizers_are_skipped_by_calibration():
    """A quantizer disabled before compute_encodings sees no data: it keeps the encoding it had
    (here none) instead of failing with 'saw no data'; enabled again, it asks for calibration."""
    sim = QuantSimModel(small(), X)
    off = next(k for k, s in ((s.key, s) for s in sim.quantizer_sites()) if s.kind != "param")
    sim.quantizers()[off].enabled = False
    calibrate(sim, X)
    assert not sim.quantizers()[off].is_initialized()
    assert all(q.is_initialized() for k, q in sim.quantizers().items() if k != off)
    sim.model(X)  # runs with that site in float
    sim.quantizers()[off].enabled = True
    with pytest.raises(NotCalibratedError, match=off):
        sim.model(X)
    calibrate(sim, X)  # and a later calibration gives it one
    assert sim.quantizers()[off].is_initialized()


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.conv(x))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


def test_untraceable_model_names_module_line_and_way_out():
    with pytest.raises(UnsupportedModelError) as info:
        QuantSimModel(DataDependent(), torch.randn(1, 3, 4, 4))
    msg = str(info.value)
    assert "'gate'" in msg and "if x.sum() > 0:" in msg and "leaf_modules=['gate']" in msg


def test_leaf_modules_way_out_works():
    model = DataDependent().eval()
    sim = QuantSimModel(model, torch.randn(1, 3, 4, 4), leaf_modules=["gate"])
    assert [(s.kind, s.op, s.where) for s in sim.quantizer_sites() if s.kind == "output"] == [
        ("output", "Conv", "conv"), ("output", "Custom", "gate")]
    calibrate(sim, torch.randn(2, 3, 4, 4))
    out = sim.model(torch.randn(2, 3, 4, 4))
    assert out.shape == (2, 3, 4, 4)


def test_unknown_leaf_module_name_is_an_error():
    with pytest.raises(UnsupportedModelError, match="Did you mean 'gate'"):
        QuantSimModel(DataDependent(), torch.randn(1, 3, 4, 4), leaf_modules=["gat"])


def test_bad_dummy_input():
    with pytest.raises(UnsupportedModelError, match="dummy_input"):
        QuantSimModel(small(), torch.randn(1, 5, 8, 8))


@pytest.mark.parametrize("kwargs, match", [
    ({"quant_scheme": "tf_enhance"}, "Did you mean 'tf_enhanced'"),
    ({"default_param_bw": 1}, "default_param_bw"),
    ({"default_output_bw": 32}, "default_output_bw"),
    ({"percentile": 20}, "percentile"),
    ({"config_file": "defualt"}, "Did you mean 'default'"),
    ({"param_quant_scheme": "percentile"}, "weights take tf or tf_enhanced"),
    ({"param_quant_scheme": "tf_enhance"}, "Did you mean 'tf_enhanced'"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(QuantConfigError, match=match):
        QuantSimModel(small(), X, **kwargs)


@pytest.mark.parametrize("scheme, param_scheme, expect_weights", [
    ("tf_enhanced", "tf", "tf"), ("tf", "tf_enhanced", "tf_enhanced"), ("tf_enhanced", None, "tf_enhanced"),
    ("percentile", None, "tf"),
])
def test_param_quant_scheme_sets_weights_only(scheme, param_scheme, expect_weights):
    """Weights follow ``param_quant_scheme``; activations follow ``quant_scheme`` whatever it is."""
    model = small()
    x = torch.randn(X.shape, generator=torch.Generator().manual_seed(0)) ** 3  # heavy tails: SQNR clips them
    sim = lambda s, p=None: calibrate(QuantSimModel(model, x, quant_scheme=s, param_quant_scheme=p, default_param_bw=4,
                                                   default_output_bw=4), x)
    mixed, acts_ref, weights_ref = sim(scheme, param_scheme), sim(scheme), sim(expect_weights)
    assert mixed.param_quant_scheme == expect_weights
    for key, q in mixed.quantizers().items():
        if mixed.plan.site(key).kind == "param":
            ref = weights_ref.quantizers()[key].encoding
        elif key == "input_1_input":  # later activations sit behind the (differently) quantized weights
            ref = acts_ref.quantizers()[key].encoding
        else:
            continue
        assert torch.equal(q.encoding.scale, ref.scale) and torch.equal(q.encoding.offset, ref.offset), key
    w = "0.weight"
    minmax, sqnr = sim("tf").quantizers()[w].encoding, sim("tf_enhanced").quantizers()[w].encoding
    assert not torch.equal(minmax.scale, sqnr.scale)  # the two weight schemes really differ here
    i = "input_1_input"
    assert not torch.equal(sim("tf").quantizers()[i].encoding.scale, sim("tf_enhanced").quantizers()[i].encoding.scale)


def test_learnable_ranges_train():
    sim = calibrate(QuantSimModel(small(), X, learnable=True), X)
    opt = torch.optim.SGD(sim.model.parameters(), lr=0.1)
    q = sim.quantizers()["input_1_input"]
    before = q.scale.detach().clone()
    sim.model.train()
    sim.model(X).pow(2).sum().backward()
    assert q.scale.grad is not None and q.scale.grad.abs().item() > 0
    opt.step()
    assert not torch.equal(before, q.scale.detach())


@pytest.mark.parametrize("bw", [4, 16])
def test_bitwidths_reach_every_site(bw):
    sim = QuantSimModel(small(), X, default_param_bw=bw, default_output_bw=bw)
    assert {s.bitwidth for s in sim.quantizer_sites()} == {bw}
