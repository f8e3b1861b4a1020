"""Observation encoders, picked from the env's Gymnasium observation space.

Every encoder maps one observation ``[*batch, *obs_shape]`` to features ``[*batch, out_dim]`` and works for
any number of leading batch dims (``[N]`` while acting, ``[B, T]`` when PPO replays slices):

- flat ``Box`` (rank 1 or 2, flattened) and ``MultiBinary``: Linear + Tanh (rlmem's original encoder);
- image ``Box`` (rank 3): a small CNN (:class:`ImageEncoder`), channels found by :func:`image_layout`;
- ``Discrete``: an embedding (the Linear of a one-hot) + Tanh;
- ``MultiDiscrete`` (1-d): each component one-hot, concatenated, Linear + Tanh (:class:`MultiDiscreteEncoder`);
- ``Dict``: one encoder per key (recursively), features concatenated in the space's key order; the
  observation is then a ``TensorDict`` (TorchRL) or a dict of arrays (Gymnasium) holding those keys. A
  ``Tuple`` observation arrives as a ``Dict`` keyed ``"0"``, ``"1"``, ... (``rlmem.env_factory.TupleAsDict``).

Integer-typed ``Box`` observations (uint8 images, byte vectors) are scaled by ``1 / 255`` when their
bounds are ``[0, 255]`` and cast to float otherwise; the scale follows the *space*, so an observation
that already arrives as float (``torch.as_tensor(obs, dtype=torch.float32)``) is scaled the same way.
"""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from rlmem.env_factory import as_observation  # noqa: F401  (where it was: agents still import it from here)

#: what :func:`build_encoder` accepts (the error for anything else names these)
SUPPORTED_OBSERVATIONS = ("Box with 1 to 3 dims (rank 3 = image [H, W, C] or [C, H, W])", "Discrete",
                          "MultiDiscrete (1-d)", "MultiBinary", "Dict or Tuple of those")


class ToFloat(nn.Module):
    """``x.float() * scale`` (integer observations: bytes to [0, 1], indices to floats)."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return x.float() * self.scale if self.scale != 1.0 else x.float()


def image_layout(shape: tuple[int, ...]) -> bool:
    """True when a rank-3 image ``shape`` is channels-last ``[H, W, C]``, False for ``[C, H, W]``.

    The channel axis is the shorter of the first and the last (channels are few, sides are not): ``(64, 64,
    3)`` and ``(8, 8, 1)`` are channels-last, ``(4, 84, 84)`` is channels-first; a tie (``(3, 5, 3)``) is
    read as channels-last, Gymnasium's layout for rendered frames.
    """
    return shape[-1] <= shape[0]


class ImageEncoder(nn.Module):
    """A small CNN: ``[*batch, H, W, C]`` (or ``[*batch, C, H, W]``) -> ``[*batch, out_dim]``.

    A 3x3 conv (32 channels, stride 1, keeps 1-pixel detail of tiny images), then 3x3 stride-2 convs (32
    channels) until the shorter side is at most 6 pixels (one for 8x8, four for 84x84), ReLU after each;
    flattened into Linear + Tanh. Stride-2 convs instead of pooling: the downsampling is learned.
    """

    def __init__(self, shape: tuple[int, ...], out_dim: int, scale: float = 1.0, channels: int = 32):
        super().__init__()
        self.channels_last = image_layout(shape)
        c, h, w = (shape[2], shape[0], shape[1]) if self.channels_last else shape
        self.shape = tuple(shape)
        self.to_float = ToFloat(scale)
        layers: list[nn.Module] = [nn.Conv2d(c, channels, 3, padding=1), nn.ReLU()]
        while min(h, w) > 6:
            layers += [nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.ReLU()]
            h, w = (h + 1) // 2, (w + 1) // 2
        self.convs = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(channels * h * w, out_dim), nn.Tanh())

    def forward(self, x):
        batch = x.shape[:-3]
        x = self.to_float(x.reshape(-1, *self.shape))
        if self.channels_last:
            x = x.permute(0, 3, 1, 2)
        return self.head(self.convs(x).flatten(1)).reshape(*batch, -1)


class DictEncoder(nn.Module):
    """One encoder per key of a ``Dict`` space; ``obs[key]`` for each key -> features concatenated."""

    def __init__(self, space: gym.spaces.Dict, out_dim: int, where: str = "observation"):
        super().__init__()
        self.keys = list(space.spaces)
        built = [build_encoder(sub, out_dim, f"{where}[{key!r}]") for key, sub in space.spaces.items()]
        self.encoders = nn.ModuleList(encoder for encoder, _ in built)  # a list: keys may hold dots
        self.out_dim = sum(dim for _, dim in built)

    def forward(self, obs):
        return torch.cat([encoder(obs[key]) for key, encoder in zip(self.keys, self.encoders)], -1)


class DiscreteEncoder(nn.Module):
    """``Discrete(n)`` index ``[*batch]`` -> ``[*batch, out_dim]`` (embedding + Tanh)."""

    def __init__(self, n: int, out_dim: int):
        super().__init__()
        self.embed = nn.Embedding(n, out_dim)

    def forward(self, x):
        return torch.tanh(self.embed(x.long()))


class MultiDiscreteEncoder(nn.Module):
    """``MultiDiscrete(nvec)`` values ``[*batch, k]`` -> ``[*batch, out_dim]``: the Linear of the concatenated
    one-hots of the components (an embedding table of ``sum(nvec)`` rows, the component's rows summed) + Tanh."""

    def __init__(self, nvec, out_dim: int):
        super().__init__()
        nvec = torch.as_tensor(np.asarray(nvec, dtype=np.int64))
        self.embed = nn.Embedding(int(nvec.sum()), out_dim)
        self.bias = nn.Parameter(torch.zeros(out_dim))
        bound = 1.0 / math.sqrt(len(nvec))  # as nn.Linear's init with k ones in the input
        nn.init.uniform_(self.embed.weight, -bound, bound)
        self.register_buffer("offsets", torch.cumsum(torch.cat([nvec.new_zeros(1), nvec[:-1]]), 0), persistent=False)

    def forward(self, x):
        return torch.tanh(self.embed(x.long() + self.offsets).sum(-2) + self.bias)


def _integer_scale(space: gym.spaces.Box) -> float:
    """1/255 for a byte-valued space, else 1 (an integer Box with other bounds is cast, not rescaled)."""
    if np.issubdtype(space.dtype, np.floating):
        return 1.0
    return 1.0 / 255.0 if np.all(space.low == 0) and np.all(space.high == 255) else 1.0


def build_encoder(space: gym.Space | int, out_dim: int, where: str = "observation") -> tuple[nn.Module, int]:
    """``(encoder, its output size)`` for observations of ``space`` (an int ``d`` means a flat ``Box(d)``).

    Raises ``ValueError`` naming the supported spaces for anything else (``where`` says which part of a
    ``Dict`` was unsupported).
    """
    if isinstance(space, int):
        return nn.Sequential(nn.Linear(space, out_dim), nn.Tanh()), out_dim
    if isinstance(space, gym.spaces.Dict):
        if not space.spaces:
            raise ValueError(f"{where}: an empty Dict observation space has nothing to encode")
        encoder = DictEncoder(space, out_dim, where)
        return encoder, encoder.out_dim
    if isinstance(space, gym.spaces.Discrete):
        if space.start != 0:
            raise ValueError(f"{where}: Discrete observations must start at 0, got {space}")
        return DiscreteEncoder(int(space.n), out_dim), out_dim
    if isinstance(space, gym.spaces.MultiDiscrete) and len(space.shape) == 1:
        if np.any(space.start != 0):
            raise ValueError(f"{where}: MultiDiscrete observations must start at 0, got {space}")
        return MultiDiscreteEncoder(space.nvec, out_dim), out_dim
    if isinstance(space, gym.spaces.Tuple) and space.spaces:  # as the Dict rlmem's envs turn it into
        return build_encoder(gym.spaces.Dict({str(i): s for i, s in enumerate(space.spaces)}), out_dim, where)
    if isinstance(space, gym.spaces.MultiBinary) and len(space.shape) == 1:
        return nn.Sequential(ToFloat(), nn.Linear(space.shape[0], out_dim), nn.Tanh()), out_dim
    if isinstance(space, gym.spaces.Box) and len(space.shape) == 3:
        return ImageEncoder(space.shape, out_dim, scale=_integer_scale(space)), out_dim
    if isinstance(space, gym.spaces.Box) and len(space.shape) in (1, 2):
        size = int(np.prod(space.shape))
        layers: list[nn.Module] = [nn.Linear(size, out_dim), nn.Tanh()]
        if len(space.shape) == 2:
            layers.insert(0, nn.Flatten(-2))
        if not np.issubdtype(space.dtype, np.floating):
            layers.insert(0, ToFloat(_integer_scale(space)))
        return nn.Sequential(*layers), out_dim
    raise ValueError(f"{where}: unsupported observation space {space}; supported: "
                     + ", ".join(SUPPORTED_OBSERVATIONS))
