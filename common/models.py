"""Teacher and student networks that return named intermediate feature maps with their logits.

Both are MONAI networks (``UNet`` by default, ``BasicUNet`` as an alternative teacher) wrapped in
:class:`FeatureNet`, whose forward returns ``(logits (B, 2, H, W), {name: (B, C_name, H/s, W/s)})``.
Feature maps are captured with forward hooks on the MONAI modules, so the network itself is
unchanged (``FeatureNet.export_network()`` gives a hook-free copy for torch.export).

Feature names are shared across architectures (:mod:`common.architectures` says which maps each
architecture returns and where they are tapped). Channels differ between networks;
the feature loss maps student channels to teacher channels with a 1x1 adapter per feature.

Default sizes (2D, 1 input channel, 2 classes): teacher UNet 16..256 with 2 residual units
= 1,625,161 parameters; student UNet 8..64 with 1 residual unit = 51,777 (3.2 %).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from common.architectures import feature_taps
from common.config import ConfigError, ModelSpec

NUM_CLASSES = 2


def build_network(spec: ModelSpec, in_channels: int = 1) -> nn.Module:
    """The bare MONAI network: (B, in_channels, H, W) -> logits (B, 2, H, W)."""
    if spec.arch == "unet":
        from monai.networks.nets import UNet

        return UNet(spatial_dims=2, in_channels=in_channels, out_channels=NUM_CLASSES,
                    channels=tuple(spec.channels), strides=tuple(spec.strides),
                    num_res_units=spec.num_res_units, dropout=spec.dropout, norm="instance")
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=2, in_channels=in_channels, out_channels=NUM_CLASSES,
                     features=tuple(spec.channels), dropout=spec.dropout)


class FeatureNet(nn.Module):
    """A segmentation network that also returns the feature maps named in ``spec.features``.

    forward(x: (B, C_in, H, W)) -> (logits (B, 2, H, W), {name: (B, C, H/stride, W/stride)}).
    H and W must be divisible by the total stride (16 for the default teacher).
    """

    def __init__(self, spec: ModelSpec, in_channels: int = 1):
        super().__init__()
        self.spec = spec
        self.in_channels = in_channels
        self.net = build_network(spec, in_channels)
        taps = feature_taps(spec)
        unknown = [n for n in spec.features if n not in taps]
        if unknown:
            raise ConfigError(f"features: unknown feature map {unknown[0]!r} for this "
                              f"architecture (valid: {', '.join(taps)})")
        self.taps = {name: taps[name] for name in spec.features}
        self._captured: dict[str, torch.Tensor] = {}
        modules = dict(self.net.named_modules())
        for name, tap in self.taps.items():
            modules[tap.module].register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            self._captured[name] = output
        return hook

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self._captured = {}
        logits = self.net(x)
        feats, self._captured = self._captured, {}
        return logits, feats

    def export_network(self) -> nn.Module:
        """A hook-free copy of the bare network (logits only), for torch.export / ONNX export."""
        net = copy.deepcopy(self.net)
        for module in net.modules():
            module._forward_hooks.clear()
        return net

    def feature_channels(self) -> dict[str, int]:
        return {name: tap.channels for name, tap in self.taps.items()}


def input_channels(data_cfg) -> int:
    """Input channels of the networks: the slice and ``data.context_slices`` neighbours per side."""
    return 2 * data_cfg.context_slices + 1


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_teacher(spec: ModelSpec, in_channels: int = 1) -> FeatureNet:
    return FeatureNet(spec, in_channels)


def build_student(student: ModelSpec, teacher: ModelSpec, in_channels: int = 1,
                  max_fraction: float = 0.05) -> FeatureNet:
    """The student; ConfigError if it has more than ``max_fraction`` of the teacher's params."""
    model = FeatureNet(student, in_channels)
    n_s = count_parameters(model)
    n_t = count_parameters(build_network(teacher, in_channels))
    if n_s > max_fraction * n_t:
        raise ConfigError(f"model.student: {n_s:,} parameters is {n_s / n_t:.1%} of the teacher's "
                          f"{n_t:,}; model.max_student_fraction allows {max_fraction:.1%}")
    return model
