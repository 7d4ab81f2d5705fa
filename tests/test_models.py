"""Model layer with real torch: shapes, seeded bit-identical initialization, the no-buffer policy,
torchvision parameter counts, and a short real training run of the cnn on Fashion-MNIST."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from spirt.data import load_dataset, minibatch_indices
from spirt.models import (
    MODEL_NAMES,
    build_model,
    count_parameters,
    model_buffers_policy,
    param_counts,
    persistent_buffer_names,
)

torch.set_num_threads(1)

SHAPES = [(1, 28, 10), (3, 32, 10)]


def _loss_and_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)  # MobileNetV3's classifier has dropout: fix its mask
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("channels, size, classes", SHAPES, ids=["1x28x28", "3x32x32"])
def test_output_shape_and_gradients(name, channels, size, classes):
    model = build_model(name, channels, classes, size, seed=0)
    assert model.training
    x = torch.randn(3, channels, size, size, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, classes - 1])
    out = model(x)
    assert out.shape == (3, classes) and out.dtype == torch.float32
    loss, grads = _loss_and_grads(model, x, y)
    assert np.isfinite(loss)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.numel() for g in grads) == count_parameters(model)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_same_seed_bit_identical_and_rng_untouched(name):
    state = torch.get_rng_state()
    a = build_model(name, 1, 10, 28, seed=42)
    b = build_model(name, 1, 10, 28, seed=42)
    c = build_model(name, 1, 10, 28, seed=43)
    assert torch.equal(torch.get_rng_state(), state), "building must not consume the caller's RNG"
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    flat_a = nn.utils.parameters_to_vector(a.parameters())
    flat_c = nn.utils.parameters_to_vector(c.parameters())
    assert not torch.equal(flat_a, flat_c)
    # Same parameters and input -> bit-identical loss and gradients (deterministic CPU kernels).
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([1, 2, 3, 4])
    la, ga = _loss_and_grads(a, x, y)
    lb, gb = _loss_and_grads(b, x, y)
    assert la == lb and all(torch.equal(u, v) for u, v in zip(ga, gb, strict=True))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_group_norm_default_keeps_all_state_in_parameters(name):
    model = build_model(name, 1, 10, 28, seed=0)
    assert model_buffers_policy(model) == "parameters-only"
    assert persistent_buffer_names(model) == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("name", ["cnn", "mobilenet_v3_small", "resnet18"])
def test_batch_norm_option_has_local_buffers(name):
    model = build_model(name, 1, 10, 28, seed=0, norm="batch")
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model_buffers_policy(model) == "local-buffers"
    assert any(n.endswith("running_mean") for n in persistent_buffer_names(model))
    # GroupNorm and BatchNorm both carry a weight and a bias per channel: same parameter count.
    assert count_parameters(model) == count_parameters(build_model(name, 1, 10, 28, seed=0))


def test_param_counts_are_torchvision_imagenet_counts():
    counts = param_counts()
    assert counts == {"mobilenet_v3_small": 2_542_856, "resnet18": 11_689_512}
    # build_model at ImageNet settings keeps the original stems, hence the same counts.
    for name, expected in counts.items():
        assert count_parameters(build_model(name, 3, 1000, 224, seed=0, norm="batch")) == expected


def test_small_image_stems():
    resnet = build_model("resnet18", 1, 10, 28, seed=0)
    assert resnet.conv1.kernel_size == (3, 3) and resnet.conv1.stride == (1, 1)
    assert resnet.conv1.in_channels == 1 and isinstance(resnet.maxpool, nn.Identity)
    assert resnet.fc.out_features == 10
    big = build_model("resnet18", 1, 10, 224, seed=0)
    assert big.conv1.kernel_size == (7, 7) and big.conv1.stride == (2, 2) and big.conv1.in_channels == 1
    mnv3 = build_model("mobilenet_v3_small", 1, 10, 28, seed=0)
    assert mnv3.features[0][0].in_channels == 1 and mnv3.features[0][0].stride == (1, 1)
    assert mnv3.classifier[-1].out_features == 10
    mnv3_big = build_model("mobilenet_v3_small", 1, 10, 224, seed=0)
    assert mnv3_big.features[0][0].stride == (2, 2)


def test_small_model_sizes():
    assert count_parameters(build_model("mlp", 1, 10, 28, seed=0)) == 784 * 200 + 200 + 200 * 200 + 200 + 2010
    assert count_parameters(build_model("cnn", 1, 10, 28, seed=0)) == 207_018


def test_argument_errors():
    with pytest.raises(ValueError, match="allowed: mlp, cnn, mobilenet_v3_small, resnet18"):
        build_model("vgg16", 1, 10, 28, seed=0)
    with pytest.raises(ValueError, match="allowed: group, batch"):
        build_model("cnn", 1, 10, 28, seed=0, norm="layer")
    for field, args in (
        ("in_channels", (0, 10, 28, 0)),
        ("num_classes", (1, 0, 28, 0)),
        ("image_size", (1, 10, -1, 0)),
        ("seed", (1, 10, 28, -1)),
    ):
        with pytest.raises(ValueError, match=field):
            build_model("mlp", *args)
    with pytest.raises(ValueError, match="image_size must be >= 4"):
        build_model("cnn", 1, 10, 3, seed=0)


def test_models_come_from_the_registry(monkeypatch):
    from spirt import models

    assert MODEL_NAMES == tuple(models.names()) == ("mlp", "cnn", "mobilenet_v3_small", "resnet18")
    monkeypatch.setattr(models.registry, "_classes", dict(models.registry._classes))
    seen = {}

    @models.register_model("zz_probe")
    def probe(in_channels, num_classes, image_size, norm):
        """A probe model: one linear layer."""
        seen.update(in_channels=in_channels, num_classes=num_classes, image_size=image_size, norm=norm)
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, num_classes))

    assert models.MODEL_NAMES[-1] == "zz_probe" and models.info("zz_probe") == "A probe model: one linear layer."
    state = torch.get_rng_state()
    a, b = build_model("zz_probe", 3, 4, 5, seed=9, norm="batch"), build_model("ZZ_PROBE", 3, 4, 5, seed=9)
    assert seen == {"in_channels": 3, "num_classes": 4, "image_size": 5, "norm": "group"}
    assert torch.equal(torch.get_rng_state(), state) and a.training
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    with pytest.raises(ValueError, match="allowed: mlp, cnn, mobilenet_v3_small, resnet18, zz_probe"):
        build_model("vgg16", 1, 10, 28, seed=0)


def test_cnn_stays_small():
    # The cnn is sized for ~12 ms per batch of 64 on one thread (measured in the round-time benchmark);
    # its size is the deterministic proxy checked here, never a wall-clock bound.
    model = build_model("cnn", 1, 10, 28, seed=0)
    assert count_parameters(model) < 300_000


def test_cnn_sgd_on_fashion_mnist_reduces_loss():
    data = load_dataset("fashion-mnist", limit_test=1000)
    model = build_model("cnn", data.channels, data.num_classes, data.image_size, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x_test, y_test = data.batch(np.arange(data.n_test), split="test")

    def evaluate() -> tuple[float, float]:
        with torch.no_grad():
            logits = model(x_test)
        return nn.functional.cross_entropy(logits, y_test).item(), (
            logits.argmax(1) == y_test
        ).float().mean().item()

    loss0, acc0 = evaluate()
    part = np.arange(data.n_train)
    for step in range(60):
        x, y = data.batch(minibatch_indices(part, 64, step, 0, seed=0))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    loss1, acc1 = evaluate()
    assert loss0 > 2.0 and acc0 < 0.3, "an untrained model is near chance"
    assert loss1 < 0.5 * loss0 and acc1 > 0.65, (loss0, loss1, acc1)


@pytest.mark.parametrize("shape", [(4, 16, 28, 28), (3, 32, 14, 14), (2, 5, 7, 9)], ids=str)
def test_channels_last_pooling_is_max_pool_2d_bit_for_bit(shape):
    """The cnn's pooling layer gives nn.MaxPool2d(2)'s values and gradients exactly, ties included (a
    constant background makes whole windows of equal maxima: the gradient goes to the first one)."""
    from spirt.layers import MaxPool2x2

    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g)
    x[:, :, : shape[2] // 2] = 0.25  # ties
    x[:, :, -2:, :3] = -1.0
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ref, out = nn.MaxPool2d(2)(a), MaxPool2x2()(b)
    upstream = torch.randn(ref.shape, generator=g)
    ref.backward(upstream)
    out.backward(upstream)
    assert out.is_contiguous() and torch.equal(out, ref)
    assert torch.equal(b.grad, a.grad)
    assert int((a.grad != 0).sum()) == ref.numel()  # one position per window took the gradient


def test_cnn_trains_as_with_torch_pooling():
    """The cnn with its pooling layer swapped for nn.MaxPool2d(2) has the same loss and gradients."""
    from spirt.layers import MaxPool2x2

    model = build_model("cnn", 1, 10, 28, seed=3)
    plain = build_model("cnn", 1, 10, 28, seed=3)
    for i, layer in enumerate(plain):
        if isinstance(layer, MaxPool2x2):
            plain[i] = nn.MaxPool2d(2)
    assert sum(isinstance(m, MaxPool2x2) for m in model.modules()) == 2
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    x[x < 0.6] = 0.0  # a background, as in Fashion-MNIST
    y = torch.arange(16) % 10
    loss, grads = _loss_and_grads(model, x, y)
    loss_ref, grads_ref = _loss_and_grads(plain, x, y)
    assert loss == loss_ref and all(torch.equal(a, b) for a, b in zip(grads, grads_ref, strict=True))
