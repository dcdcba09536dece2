"""Which feature maps each supported architecture can return, and where they are tapped.

Feature names are shared across architectures so that a student can be distilled from teachers
of different architectures: ``enc{k}`` is the encoder output at stride 2**k, ``dec{k}`` the
decoder output at stride 2**k (k >= 1), ``bottleneck`` the deepest map. This module is plain
Python over a :class:`~common.config.ModelSpec` (no torch), so the config can validate feature
names and :mod:`common.models` can build the hooks, without either importing the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.config import ModelSpec


@dataclass(frozen=True)
class FeatureTap:
    module: str     # dotted path of the MONAI submodule whose output is the feature
    channels: int
    stride: int


def _unet_taps(spec: ModelSpec) -> dict[str, FeatureTap]:
    """Walk MONAI UNet's nested structure: level k is ``Sequential(down, SkipConnection(sub), up)``
    at path ``model(.1.submodule)*k``; the deepest SkipConnection wraps the bottom layer."""
    ch, st = spec.channels, spec.strides
    taps, path, stride = {}, "model", 1
    for k in range(len(ch) - 1):
        stride *= st[k]
        taps[f"enc{k + 1}"] = FeatureTap(f"{path}.0", ch[k], stride)
        if k >= 1:
            taps[f"dec{k}"] = FeatureTap(f"{path}.2", ch[k - 1], stride // st[k])
        path = f"{path}.1.submodule"
    taps["bottleneck"] = FeatureTap(path, ch[-1], stride)
    return taps


def _basicunet_taps(spec: ModelSpec) -> dict[str, FeatureTap]:
    f = spec.channels
    taps = {f"enc{k}": FeatureTap(f"down_{k}", f[k], 2 ** k) for k in range(1, 4)}
    taps["bottleneck"] = FeatureTap("down_4", f[4], 16)
    for k in range(1, 4):  # upcat_{k+1} outputs at stride 2**k with f[k] channels
        taps[f"dec{k}"] = FeatureTap(f"upcat_{k + 1}", f[k], 2 ** k)
    return taps


def feature_taps(spec: ModelSpec) -> dict[str, FeatureTap]:
    return _unet_taps(spec) if spec.arch == "unet" else _basicunet_taps(spec)


def feature_names(spec: ModelSpec) -> list[str]:
    """The feature maps an architecture can return (valid values of ``features``)."""
    return list(feature_taps(spec))
