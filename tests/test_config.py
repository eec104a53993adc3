import json

import pytest

from qat_plugin import QuantConfigError, load_config, preset_names


def test_presets_ship_with_the_package():
    assert {"default", "tensorrt"} <= set(preset_names())
    d, t = load_config("default"), load_config("tensorrt")
    assert not d.ops_symmetric and d.params_symmetric and d.per_channel_quantization
    assert t.ops_symmetric and t.rule("Concat").shared_encoding
    assert ("Conv", "BatchNormalization", "Relu") in d.supergroups


def test_value_preserving_ops_default_to_no_requantization():
    cfg = load_config({})
    assert not cfg.is_output_quantized("MaxPool") and cfg.is_output_quantized("AveragePool")
    assert load_config({"op_type": {"MaxPool": {"is_output_quantized": True}}}).is_output_quantized("MaxPool")


@pytest.mark.parametrize("data, match", [
    ({"defaults": {"ops": {"is_symetric": True}}}, "defaults.ops.is_symetric.*Did you mean 'is_symmetric'"),
    ({"defualts": {}}, "Did you mean 'defaults'"),
    ({"op_type": {"Convv": {}}}, "Did you mean 'Conv'"),
    ({"op_type": {"Conv": {"is_output_quantised": False}}}, "Did you mean 'is_output_quantized'"),
    ({"defaults": {"ops": {"is_symmetric": "True"}}}, "JSON boolean.*without quotes"),
    ({"supergroups": [{"op_list": ["Conv", "Relux"]}]}, "Did you mean 'Relu'"),
    ({"supergroups": [{"op_list": ["Conv"]}]}, "at least two"),
    ({"supergroups": [{"ops": ["Conv", "Relu"]}]}, "Did you mean 'op_list'"),
    ({"op_type": {"Add": {"shared_encoding": True}}}, "only meaningful for Concat"),
    ({"op_type": {"Relu": {"per_channel_quantization": True}}}, "has no weight"),
    ({"params": {"weights": {}}}, "Did you mean 'weight'"),
    ({"model_input": {"is_input_quantized": 1}}, "JSON boolean"),
])
def test_bad_configs_name_the_key_and_suggest(data, match):
    with pytest.raises(QuantConfigError, match=match):
        load_config(data)


def test_json_file_round_trip(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"name": "mine", "defaults": {"per_channel_quantization": False}}))
    cfg = load_config(str(path))
    assert cfg.name == "mine" and not cfg.weight_per_channel("Conv")


def test_invalid_json_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(QuantConfigError, match="not valid JSON"):
        load_config(str(path))
