"""utils: the device and precision choice, CPU features, image range."""
import contextlib
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
    assert [utils.autocast_dtype(p, cpu) for p in ("fp32", "bf16", "fp16", "bf16-sim")] == \
        [None, torch.bfloat16, torch.float16, torch.bfloat16]
    assert [utils.resolved_precision(p, cpu) for p in ("fp32", "bf16", "fp16", "bf16-sim")] == \
        ["fp32", "bf16", "fp16", "bf16-sim"]


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


def _conv(x, w, b):
    return torch.nn.functional.conv2d(x, w, b, stride=2, padding=1)


def _conv_transpose(x, w, b):
    return torch.nn.functional.conv_transpose2d(x, w, b, stride=2, padding=1)


def _attention(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=1.0)


SIMULATED_OPS = {  # the ops of G and D that SimulatedBf16 computes in fp32, with inputs of their shapes in the models
    "conv2d": (_conv, [(4, 32, 14, 14), (16, 32, 4, 4), (16,)]),
    "conv_transpose2d": (_conv_transpose, [(4, 32, 7, 7), (32, 16, 4, 4), (16,)]),
    "linear": (torch.nn.functional.linear, [(4, 128), (64, 128), (64,)]),
    "matmul": (torch.bmm, [(2, 196, 8), (2, 8, 196)]),
}


def _bf16_autocast(op, inputs, simulate, grad_out=None):
    """op's output under bf16 autocast and, given the output's gradient, the inputs' gradients."""
    leaves = [t.clone().requires_grad_() for t in inputs]
    with utils.SimulatedBf16() if simulate else contextlib.nullcontext():
        with torch.autocast("cpu", torch.bfloat16):
            out = op(*leaves)
        if grad_out is not None:
            out.backward(grad_out.to(out.dtype))
    return out, [leaf.grad for leaf in leaves]


def _randn(shapes, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for shape in shapes]


@pytest.mark.parametrize("name", SIMULATED_OPS)
def test_simulated_bf16_rounds_fp32_arithmetic_on_bf16_values_once_forward_and_backward(name):
    op, shapes = SIMULATED_OPS[name]
    inputs = _randn(shapes, 0)
    native_out, _ = _bf16_autocast(op, inputs, simulate=False)
    grad_out = _randn([native_out.shape], 1)[0]
    out, grads = _bf16_autocast(op, inputs, simulate=True, grad_out=grad_out)
    assert out.dtype == native_out.dtype == torch.bfloat16  # what autocast's own kernel returns
    # the definition: fp32 arithmetic on the bf16 values, each result rounded to bf16 once (as AMX and AVX512-BF16
    # kernels do; torch's generic kernels round more often in transposed convolutions and convolution gradients)
    rounded = [t.bfloat16().float().requires_grad_() for t in inputs]
    expected = op(*rounded)
    expected.backward(grad_out.bfloat16().float())
    assert torch.equal(out, expected.bfloat16())
    for grad, leaf in zip(grads, rounded):
        assert grad.dtype == torch.float32 and torch.equal(grad, leaf.grad.bfloat16().float())


@pytest.mark.parametrize("name", ["conv2d", "linear", "matmul"])
def test_simulated_bf16_matches_native_kernels_that_round_once(name):
    # torch's bf16 kernels for these ops on this CPU already round once: the simulation gives their numbers
    op, shapes = SIMULATED_OPS[name]
    inputs = _randn(shapes, 2)
    native, _ = _bf16_autocast(op, inputs, simulate=False)
    simulated, _ = _bf16_autocast(op, inputs, simulate=True)
    torch.testing.assert_close(simulated, native, rtol=2 ** -7, atol=1e-6)  # at most one bf16 rounding step apart


def test_simulated_bf16_leaves_attention_to_torchs_own_bf16_kernel():
    # the models' shapes (attention.py pads query and key to the value's width for the flash kernel); that kernel
    # rounds the softmax weights to bf16, which fp32 arithmetic on bf16 values would not
    inputs = _randn([(2, 1, 196, 16)] * 3, 3)
    grad_out = _randn([(2, 1, 196, 16)], 4)[0]
    native_out, native_grads = _bf16_autocast(_attention, inputs, simulate=False, grad_out=grad_out)
    out, grads = _bf16_autocast(_attention, inputs, simulate=True, grad_out=grad_out)
    assert torch.equal(out, native_out) and all(torch.equal(a, b) for a, b in zip(grads, native_grads))
