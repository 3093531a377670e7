"""utils: the device and precision choice, CPU features, image range."""
import pytest
import torch

import utils


def test_auto_precision_is_bf16_on_a_cpu_with_native_bf16_and_fp32_without(monkeypatch):
    cpu = torch.device("cpu")
    for features, expected in (({"amx": True, "avx512_bf16": False, "avx2": True}, torch.bfloat16),
                               ({"amx": False, "avx512_bf16": True, "avx2": True}, torch.bfloat16),
                               ({"amx": False, "avx512_bf16": False, "avx2": True}, None)):
        monkeypatch.setattr(utils, "cpu_features", lambda features=features: features)
        assert utils.autocast_dtype("auto", cpu) is expected
    assert utils.autocast_dtype("auto", torch.device("mps")) is None  # MPS: fp32 unless asked


def test_explicit_precisions_are_taken_as_asked_whatever_the_cpu():
    cpu = torch.device("cpu")
    assert [utils.autocast_dtype(p, cpu) for p in ("fp32", "bf16", "fp16")] == [None, torch.bfloat16, torch.float16]
    assert [utils.precision_name(utils.autocast_dtype(p, cpu)) for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]


def test_this_machines_cpu_features_match_what_auto_chooses():
    features = utils.cpu_features()
    assert set(features) == {"amx", "avx512_bf16", "avx2"} and all(isinstance(v, bool) for v in features.values())
    native = features["amx"] or features["avx512_bf16"]
    assert utils.autocast_dtype("auto", torch.device("cpu")) is (torch.bfloat16 if native else None)
    assert utils.cpu_name()


def test_to_unit_range_maps_minus_one_to_one_onto_zero_to_one_and_clamps():
    assert utils.to_unit_range(torch.tensor([-1.0, 0.0, 1.0, 3.0])).tolist() == [0.0, 0.5, 1.0, 1.0]


def test_asking_for_a_missing_accelerator_says_so():
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            utils.pick_device("cuda")
