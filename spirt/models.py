"""Model layer: the networks peers train, built deterministically from a seed.

Design fact that shapes this module: peers and their stateless gradient functions exchange only the
flattened *parameters* (and gradients). Anything a model keeps outside its parameters — BatchNorm's
``running_mean``/``running_var``/``num_batches_tracked`` buffers — is never averaged, so it would drift
apart between functions and peers, and a function that starts from parameters alone could not even
reproduce it. Hence the default ``norm="group"``: GroupNorm has no buffers (its statistics come from
the sample itself), is deterministic, and is the usual choice for federated training with non-IID
data (Hsieh et al., 2020, "The Non-IID Data Quagmire of Decentralized Machine Learning").
``norm="batch"`` is allowed for comparison; :func:`model_buffers_policy` tells which case a model is.

Every model is a builder function registered by name (:func:`register_model`), so adding one is one
decorated function. torch is imported inside the builders, not with this module: the launcher reads the
registered names to validate a configuration and should not pay seconds for a torch import.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from .registry import Registry

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "MODEL_NAMES",  # noqa: F822 (module __getattr__, read from the registry)
    "NORMS",
    "SMALL_IMAGE_MAX",
    "build_model",
    "count_parameters",
    "info",
    "model_buffers_policy",
    "names",
    "param_counts",
    "persistent_buffer_names",
    "register_model",
    "registry",
]

#: model name -> builder ``(in_channels, num_classes, image_size, norm) -> nn.Module``; names are listed
#: in registration order, from the smallest model to the largest
registry = Registry("model", sort=False)
NORMS = ("group", "batch")
# Images up to this side get the CIFAR-style stems below; larger ones keep the ImageNet stems.
SMALL_IMAGE_MAX = 64
# GroupNorm groups: 32 as in Wu & He (2018) where the channel count allows it.
_MAX_GROUPS = 32


def register_model(name: str, aliases: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Decorator registering a model builder under ``name``.

    The builder is called as ``builder(in_channels, num_classes, image_size, norm)`` inside
    :func:`build_model`, which validates the arguments and seeds torch first; it returns an untrained
    ``nn.Module`` and imports torch itself. The first paragraph of its docstring is what ``spirt list``
    shows.
    """
    return registry.register(name, aliases)


def names() -> list[str]:
    """The registered model names, from the smallest model to the largest."""
    return registry.names()


def info(name: str) -> str:
    """One-line description of the model ``name``."""
    return registry.info(name)


def __getattr__(attr: str) -> Any:
    # MODEL_NAMES is read from the registry on every access, so it includes models registered later
    if attr == "MODEL_NAMES":
        return tuple(registry.names())
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def _group_norm(num_channels: int) -> nn.GroupNorm:
    """GroupNorm with gcd(C, 32) groups: the channel counts of the torchvision models (16, 24, 40, 72,
    88, 120, 576, ...) are not all multiples of 32, and the group count must divide C."""
    from torch import nn

    return nn.GroupNorm(math.gcd(num_channels, _MAX_GROUPS), num_channels)


def _norm_layer(norm: str) -> Callable[[int], nn.Module] | None:
    """Factory ``C -> norm module`` for torchvision's ``norm_layer`` argument (None = its default)."""
    if norm == "group":
        return _group_norm
    return None


# --------------------------------------------------------------------------------------------------
# The small models
# --------------------------------------------------------------------------------------------------


@register_model("mlp")
def _mlp(
    in_channels: int, num_classes: int, image_size: int, norm: str = "group", hidden: int = 200
) -> nn.Module:
    """Flatten -> 200 ReLU -> 200 ReLU -> classes (the MLP of McMahan et al., 2017); no normalization,
    so ``norm`` does not apply."""
    from torch import nn

    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * image_size * image_size, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


@register_model("cnn")
def _cnn(in_channels: int, num_classes: int, image_size: int, norm: str) -> nn.Module:
    """Two 3x3 conv blocks (16, 32 channels) + FC 128 + classifier.

    Each block is conv -> 2x2 max-pool -> norm -> ReLU: normalizing after pooling costs a quarter of
    normalizing before it, which keeps a forward+backward of a batch of 64 28x28 images near 12 ms on
    one thread, and the norm makes plain SGD (lr 0.05-0.1) reach about 85% on Fashion-MNIST within
    400 steps of batch 64. Channel counts are kept small for the same cost reason.
    """
    from torch import nn

    from .layers import MaxPool2x2

    c1, c2, fc = 16, 32, 128

    def norm2d(c: int) -> nn.Module:
        if norm == "group":
            return nn.GroupNorm(8, c)
        return nn.BatchNorm2d(c)

    side = image_size // 2 // 2  # two floor-halving pools
    if side < 1:
        raise ValueError(f"image_size must be >= 4 for 'cnn', got {image_size}")
    return nn.Sequential(
        nn.Conv2d(in_channels, c1, 3, padding=1),
        MaxPool2x2(),
        norm2d(c1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1),
        MaxPool2x2(),
        norm2d(c2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(c2 * side * side, fc),
        nn.ReLU(),
        nn.Linear(fc, num_classes),
    )


# --------------------------------------------------------------------------------------------------
# torchvision models
# --------------------------------------------------------------------------------------------------


def _stem_conv(in_channels: int, out_channels: int, kernel: int, stride: int) -> nn.Conv2d:
    """A replacement first convolution, initialized as torchvision initializes its convolutions."""
    from torch import nn

    conv = nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


@register_model("mobilenet_v3_small")
def _mobilenet_v3_small(in_channels: int, num_classes: int, image_size: int, norm: str) -> nn.Module:
    """torchvision's MobileNetV3-small, untrained, adapted to the input.

    Small images (<= :data:`SMALL_IMAGE_MAX`): the stem convolution gets stride 1 instead of 2, the
    usual CIFAR adaptation, rather than upsampling the input. With the remaining total stride of 16 a
    28x28 image reaches the classifier as a 2x2 map (32x32 -> 2x2), at about the cost of a 56x56 image
    at the original stride; upsampling to 224 would cost ~16x more for no extra information.
    """
    from torchvision.models import mobilenet_v3_small

    kwargs = {} if _norm_layer(norm) is None else {"norm_layer": _norm_layer(norm)}
    model = mobilenet_v3_small(weights=None, num_classes=num_classes, **kwargs)
    stem = model.features[0][0]
    stride = 1 if image_size <= SMALL_IMAGE_MAX else 2
    if in_channels != stem.in_channels or stride != stem.stride[0]:
        model.features[0][0] = _stem_conv(in_channels, stem.out_channels, 3, stride)
    return model


@register_model("resnet18")
def _resnet18(in_channels: int, num_classes: int, image_size: int, norm: str) -> nn.Module:
    """torchvision's ResNet-18, untrained, adapted to the input.

    Small images (<= :data:`SMALL_IMAGE_MAX`) get the customary CIFAR/MNIST stem: a 3x3 stride-1
    convolution and no max-pool (the ImageNet 7x7/2 conv + 3x3/2 pool would shrink 28x28 to 7x7 before
    the first residual block). Larger images keep the ImageNet stem, with the input channels adapted.
    """
    from torch import nn
    from torchvision.models import resnet18

    kwargs = {} if _norm_layer(norm) is None else {"norm_layer": _norm_layer(norm)}
    model = resnet18(weights=None, num_classes=num_classes, **kwargs)
    if image_size <= SMALL_IMAGE_MAX:
        model.conv1 = _stem_conv(in_channels, 64, 3, 1)
        model.maxpool = nn.Identity()
    elif in_channels != model.conv1.in_channels:
        model.conv1 = _stem_conv(in_channels, 64, 7, 2)
    return model


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def _check_pos_int(field: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field} must be an int >= 1, got {value!r}")
    return value


def build_model(
    name: str,
    in_channels: int,
    num_classes: int,
    image_size: int,
    seed: int,
    norm: str = "group",
) -> nn.Module:
    """Build an untrained model; the same arguments give bit-identical parameters.

    Parameters
    ----------
    name : str
        A registered model (:func:`names`): ``"mlp"`` (2 hidden layers of 200), ``"cnn"`` (2 conv blocks +
        FC), ``"mobilenet_v3_small"`` and ``"resnet18"`` (torchvision, ``weights=None``, first conv and
        classifier adapted, small-image stems; see their builders).
    in_channels, num_classes, image_size : int
        Input channels, output classes, and input side (square images).
    seed : int
        Initialization seed. The global torch RNG is seeded only inside a fork, so the caller's RNG
        state is left as it was.
    norm : {"group", "batch"}
        Normalization of ``cnn`` and the torchvision models (``mlp`` has none). ``"group"`` keeps all
        state in parameters (see the module docstring); ``"batch"`` gives BatchNorm with running-stat
        buffers that peers do not exchange.

    Returns
    -------
    torch.nn.Module
        In training mode, float32, on the CPU.
    """
    if name not in registry:
        raise ValueError(f"unknown model name {name!r}; allowed: {', '.join(registry.names())}")
    builder = registry.cls(name)
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; allowed: {', '.join(NORMS)}")
    _check_pos_int("in_channels", in_channels)
    _check_pos_int("num_classes", num_classes)
    _check_pos_int("image_size", image_size)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = builder(in_channels, num_classes, image_size, norm)
    return model.train()


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (what a peer sends when it ships its flattened model)."""
    return sum(p.numel() for p in model.parameters())


def persistent_buffer_names(model: nn.Module) -> list[str]:
    """Names of buffers saved in ``state_dict`` (e.g. BatchNorm running stats): state outside parameters."""
    params = {name for name, _ in model.named_parameters()}
    return [name for name in model.state_dict() if name not in params]


def model_buffers_policy(model: nn.Module) -> str:
    """How a model's non-parameter state is handled when peers exchange flattened parameters.

    Returns
    -------
    str
        ``"parameters-only"``: no persistent buffers; the flattened parameter vector is the whole
        model, so every peer and function holding it computes identical outputs and gradients.
        ``"local-buffers"``: the model has buffers (BatchNorm running stats). They are *not*
        exchanged or averaged: each function/peer keeps (or rebuilds) its own copy, training-mode
        gradients use batch statistics and are unaffected, but eval-mode outputs differ between
        holders of the same parameters. Build with ``norm="group"`` to avoid this.
    """
    return "local-buffers" if persistent_buffer_names(model) else "parameters-only"


@lru_cache(maxsize=1)
def _imagenet_counts() -> tuple[tuple[str, int], ...]:
    import torch
    from torchvision.models import mobilenet_v3_small, resnet18

    # The meta device allocates no memory and skips the (slow) random initialization.
    with torch.device("meta"):
        return (
            ("mobilenet_v3_small", count_parameters(mobilenet_v3_small(weights=None))),
            ("resnet18", count_parameters(resnet18(weights=None))),
        )


def param_counts() -> dict[str, int]:
    """Parameter counts of torchvision's mobilenet_v3_small and resnet18 at ImageNet defaults.

    3 input channels, 1000 classes, BatchNorm (GroupNorm has the same count): 2,542,856 and
    11,689,512. Benchmarks use them to pick realistic tensor sizes.
    """
    return dict(_imagenet_counts())
