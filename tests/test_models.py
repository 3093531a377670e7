"""Networks: shapes, attention really applied, fused == explicit attention, spectral norm, compile."""
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import model_28
import model_64
from attention import SelfAttention, attention_layers
from spectral import largest_singular_value, spectral_normed_modules

ROOT = Path(__file__).resolve().parent.parent

MODELS = [model_28, model_64]
VARIANTS = ["original", "scaled", "paper"]


def _build(module, attn=True, variant="original", **kwargs):
    return module.Generator(attn=attn, attn_variant=variant, **kwargs), module.Discriminator(attn=attn, attn_variant=variant, **kwargs)


def _relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


def _randomise_gammas(model):
    with torch.no_grad():
        for layer in attention_layers(model):
            layer.gamma.normal_()


@pytest.mark.parametrize("module", MODELS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("attn", [True, False], ids=["attn", "noattn"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("batch", [1, 64])
def test_shapes(module, attn, variant, batch):
    G, D = _build(module, attn, variant)
    _randomise_gammas(G)
    images = G(torch.randn(batch, 100))
    assert images.shape == (batch, *module.IMAGE_SHAPE)
    assert images.min() >= -1 and images.max() <= 1
    assert D(images).shape == (batch,)
    assert G(torch.randn(batch, 100, 1, 1)).shape == images.shape


@pytest.mark.parametrize("module", MODELS, ids=lambda m: m.__name__)
def test_imports_as_the_notebooks_do(module):
    assert module.SelfAttention is SelfAttention
    assert {"Generator", "Discriminator", "SelfAttention"} <= set(module.__all__)


def test_bad_inputs_are_refused_with_the_expected_shape():
    G, D = _build(model_28)
    with pytest.raises(ValueError, match=r"\(B, 100\)"):
        G(torch.randn(2, 64))
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\)"):
        D(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match="attn_variant"):
        model_64.Generator(attn_variant="fancy")


@pytest.mark.parametrize("module", MODELS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("variant", VARIANTS)
def test_attention_layer_counts_and_no_parameters_without_attention(module, variant):
    expected = 1 if module is model_28 else 2
    G, D = _build(module, True, variant)
    assert len(G.attention_gammas()) == expected and len(D.attention_gammas()) == expected
    G0, D0 = _build(module, False, variant)
    for net in (G0, D0):
        assert net.attention_gammas() == []
        assert not any("gamma" in name or "query" in name for name, _ in net.named_parameters())
    assert sum(p.numel() for p in G0.parameters()) < sum(p.numel() for p in G.parameters())


@pytest.mark.parametrize("variant", VARIANTS)
def test_attention_is_identity_at_init(variant):
    layer = SelfAttention(64, variant)
    x = torch.randn(2, 64, 8, 8)
    assert torch.equal(layer(x), x)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_fused_path_equals_explicit_path(variant, channels_last):
    layer = SelfAttention(64, variant)
    with torch.no_grad():
        layer.gamma.fill_(0.7)
    x = torch.randn(3, 64, 16, 16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x_fused, x_explicit = x.clone().requires_grad_(), x.clone().requires_grad_()
    upstream = torch.randn(3, 64, 16, 16)

    # The key bias shifts each softmax row by a constant: its true gradient is 0, only rounding noise.
    compared = [p for name, p in layer.named_parameters() if name != "key.bias"]
    fused = layer(x_fused)
    (fused * upstream).sum().backward()
    grads_fused = [x_fused.grad] + [p.grad.clone() for p in compared]
    assert layer.key.bias.grad.abs().max() < 1e-4
    layer.zero_grad()
    explicit, attention = layer(x_explicit, return_attention=True)
    (explicit * upstream).sum().backward()
    grads_explicit = [x_explicit.grad] + [p.grad.clone() for p in compared]

    keys = 64 if variant == "paper" else 256
    assert attention.shape == (3, 256, keys)
    torch.testing.assert_close(attention.sum(-1), torch.ones(3, 256))
    assert not torch.equal(fused, x)
    assert _relative_error(fused, explicit) < 1e-5
    for g_fused, g_explicit in zip(grads_fused, grads_explicit):
        assert _relative_error(g_fused, g_explicit) < 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_path_runs_the_flash_kernel(variant):
    layer = SelfAttention(64, variant)
    x = torch.randn(2, 64, 8, 8, requires_grad=True)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        layer(x).sum().backward()
    # The arrangement matters: the unpadded, unequal widths have no flash kernel.
    q, v = torch.randn(2, 1, 64, 32), torch.randn(2, 1, 64, 64)
    with pytest.raises(RuntimeError), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        F.scaled_dot_product_attention(q, q, v, scale=1.0)


def test_softmax_is_fp32_under_autocast():
    layer = SelfAttention(32)
    x = torch.randn(2, 32, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, attention = layer(x, return_attention=True)
        fused = layer(x)
    assert attention.dtype == torch.float32
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 64))
    assert fused.shape == out.shape and torch.isfinite(fused).all()


@pytest.mark.parametrize("module", MODELS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("variant", VARIANTS)
def test_gamma_receives_gradient_in_G_and_D(module, variant):
    """The original 28x28 model never applied attention: its gammas would get no gradient."""
    G, D = _build(module, True, variant)
    _randomise_gammas(G)
    _randomise_gammas(D)
    D(G(torch.randn(4, 100))).mean().backward()
    for net in (G, D):
        for layer in attention_layers(net):
            assert layer.gamma.grad is not None and layer.gamma.grad.abs() > 0


@pytest.mark.parametrize("module", MODELS, ids=lambda m: m.__name__)
def test_spectral_norm_bounds_every_normed_weight(module):
    G, D = _build(module)
    with torch.no_grad():
        D(G(torch.randn(2, 100)))
        for net in (G, D):
            normed = list(spectral_normed_modules(net))
            assert len(normed) == (3 if module is model_28 else 4)
            for layer in normed:
                for _ in range(30):  # each training-mode weight access runs one power iteration
                    layer.weight
                assert largest_singular_value(layer) == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("make", [lambda: nn.Linear(7, 3), lambda: nn.Linear(3, 7), lambda: nn.Conv2d(3, 5, 4),
                                  lambda: nn.ConvTranspose2d(5, 3, 4)], ids=["wide", "tall", "conv", "conv-transpose"])
def test_largest_singular_value_is_the_weight_matrix_spectral_norm(make):
    layer = make()
    with torch.no_grad():
        layer.weight.mul_(5.0)  # well away from 1, where spectral-normed weights sit
    dim = 1 if isinstance(layer, nn.ConvTranspose2d) else 0  # a transposed conv's output channels come second
    matrix = layer.weight.detach().movedim(dim, 0).flatten(1).double()
    expected = torch.linalg.matrix_norm(matrix, ord=2).item()
    assert expected > 1.5
    assert largest_singular_value(layer) == pytest.approx(expected, rel=1e-9)


def test_eval_mode_leaves_power_iteration_vectors_unchanged():
    G, D = _build(model_64)
    G.eval()
    D.eval()
    before = {name: b.clone() for net in (G, D) for name, b in net.named_buffers(prefix=type(net).__name__) if "_u" in name or "_v" in name}
    assert before
    with torch.no_grad():
        D(G(torch.randn(2, 100)))
    after = {name: b for net in (G, D) for name, b in net.named_buffers(prefix=type(net).__name__) if name in before}
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_plain_layers_without_spectral_norm():
    G, D = _build(model_28, spectral_norm=False)
    assert not list(spectral_normed_modules(G)) and not list(spectral_normed_modules(D))


def test_channels_last_and_bf16_autocast():
    G, D = _build(model_64)
    G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = D(G(torch.randn(2, 100)))
    assert logits.shape == (2,) and torch.isfinite(logits).all()


@pytest.mark.slow
def test_torch_compile_smoke():
    try:
        import torch._inductor  # noqa: F401
    except Exception as error:  # pragma: no cover - depends on the platform
        pytest.skip(f"torch.compile is unavailable here: {error}")
    G, D = _build(model_28)
    _randomise_gammas(G)
    _randomise_gammas(D)
    z = torch.randn(4, 100)
    G.eval(), D.eval()
    with torch.no_grad():
        expected = D(G(z))
        compiled = torch.compile(D)(torch.compile(G)(z))
    torch.testing.assert_close(compiled, expected, rtol=1e-4, atol=1e-4)


def test_num_classes_zero_is_todays_model_bit_for_bit():
    for module in MODELS:
        for net in ("Generator", "Discriminator"):
            torch.manual_seed(0)
            plain = getattr(module, net)()
            torch.manual_seed(0)
            zero = getattr(module, net)(num_classes=0)
            assert list(plain.state_dict()) == list(zero.state_dict())
            assert all(torch.equal(v, zero.state_dict()[k]) for k, v in plain.state_dict().items())
    G = model_28.Generator()
    assert [name for name in G.state_dict() if name.startswith("net.1.")] == [
        "net.1.weight", "net.1.bias", "net.1.running_mean", "net.1.running_var", "net.1.num_batches_tracked"]


@pytest.mark.parametrize("module", MODELS, ids=lambda m: m.__name__)
def test_the_projection_term_is_the_inner_product_of_the_class_embedding_and_pooled_features(module):
    D = module.Discriminator(num_classes=10).eval()
    x = torch.randn(3, *module.IMAGE_SHAPE)
    y = torch.tensor([0, 4, 9])
    with torch.no_grad():
        logits = D(x, y)
        features = D.net[:-1](x)
        unconditional = D.net[-1](features).flatten()
        by_hand = torch.stack([D.embed.weight[label] @ features[i].sum(dim=(1, 2)) for i, label in enumerate(y)])
        assert torch.allclose(logits, unconditional + by_hand, atol=1e-4)
        assert not torch.allclose(D(x, torch.tensor([1, 4, 9])), logits), "another label, another logit"


def test_per_class_batchnorm_uses_the_row_of_the_requested_class():
    G = model_28.Generator(num_classes=10, conv_dim=16, conditioning="per-class").eval()
    norm = G.net[1]
    with torch.no_grad():
        norm.gain.weight[3].fill_(2.0)
        norm.bias.weight[3].fill_(0.5)
        x = torch.randn(2, 128, 3, 3)
        out = norm(x, torch.tensor([3, 0]))
        normalised = norm.norm(x)
    assert torch.allclose(out[0], 2.0 * normalised[0] + 0.5) and torch.allclose(out[1], normalised[1])


def test_labels_are_required_checked_and_refused_where_they_do_not_belong():
    G, D = model_28.Generator(num_classes=10, conv_dim=16), model_28.Discriminator(num_classes=10, conv_dim=16)
    z = torch.randn(2, 100)
    with pytest.raises(ValueError, match="class-conditional: pass labels y"):
        G(z)
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.9, got 3\.\.10"):
        G(z, torch.tensor([3, 10]))
    with pytest.raises(ValueError, match="LongTensor of shape"):
        D(torch.randn(2, 1, 28, 28), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="unconditional"):
        model_28.Generator(conv_dim=16)(z, torch.tensor([0, 1]))
    assert G(z, torch.tensor([0, 9])).shape == (2, 1, 28, 28)


def test_shared_class_batchnorm_maps_the_class_embedding_to_gain_and_bias():
    G = model_28.Generator(num_classes=10, conv_dim=16).eval()  # conditioning="shared", BigGAN's
    norm = G.net[1]
    assert G.class_embedding.weight.shape == (10, 128) and norm.gain.weight.shape == (128, 128)
    x, y = torch.randn(2, 128, 3, 3), torch.tensor([3, 0])
    with torch.no_grad():
        embedding = G.class_embedding(y)
        out = norm(x, embedding)
        expected = norm.norm(x) * (1 + embedding @ norm.gain.weight.T)[:, :, None, None] + \
            (embedding @ norm.bias.weight.T)[:, :, None, None]
    torch.testing.assert_close(out, expected)


def _class_gains(G, classes):
    with torch.no_grad():
        norm = G.net[1]
        if G.conditioning == "shared":
            return 1 + norm.gain(G.class_embedding(classes))
        return norm.gain(classes)


def test_shared_conditioning_moves_the_class_gains_many_times_faster_under_adam():
    """The cause of the conditional model's slow start: a per-class table's entries move at most about the learning
    rate per Adam step; through the shared embedding and linear maps, a class's gains move far more."""
    moved = {}
    for conditioning in ("per-class", "shared"):
        torch.manual_seed(0)
        G = model_28.Generator(num_classes=10, conv_dim=16, conditioning=conditioning)
        optimizer = torch.optim.Adam(G.parameters(), 2e-4, betas=(0.0, 0.9))
        classes = torch.arange(10)
        before = _class_gains(G, classes)
        z, y = torch.randn(64, 100), torch.arange(64) % 10
        G(z, y).square().mean().backward()
        optimizer.step()
        moved[conditioning] = (_class_gains(G, classes) - before).abs().mean().item()
    assert moved["per-class"] == pytest.approx(2e-4, rel=0.05)
    assert moved["shared"] > 10 * moved["per-class"]


def test_the_published_per_class_conditional_weights_still_load():
    from checkpoint import load_generator

    G, info = load_generator(ROOT / "weights" / "sagan_mnist_conditional.pt")
    if "conditioning" not in info["model_kwargs"]:  # published before the shared conditioning existed
        assert G.conditioning == "per-class"
    assert G.sample(torch.randn(4, 100), torch.tensor([0, 1, 2, 3])).shape == (4, 1, 28, 28)


def test_the_scaled_variant_divides_the_original_scores_by_the_square_root_of_the_query_width():
    torch.manual_seed(0)
    original = SelfAttention(64, "original")
    scaled = SelfAttention(64, "scaled")
    scaled.load_state_dict(original.state_dict())
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        q, k, _ = original._project(x)
        expected = torch.softmax(torch.bmm(q, k.transpose(1, 2)) / 32 ** 0.5, dim=-1)
        _, attention = scaled(x, return_attention=True)
    torch.testing.assert_close(attention, expected)
    assert scaled.scale == 32 ** -0.5 and original.scale == 1.0
