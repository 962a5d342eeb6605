"""A network whose predictions are known in advance, for following pixels through real bundle runs.

``python -m monai.bundle run ... --network_def#_target_ tests.stand_in.StandInNet`` swaps it in for
the U-Net (it takes the same arguments as :func:`monai_unet_bundle.networks.build_network`), so a
test can compute exactly what every option must write.  Its one parameter makes ``model.pt`` a
real state dict loaded by the real checkpoint loader.
"""

from __future__ import annotations

import torch

GAIN = 50.0


class StandInNet(torch.nn.Module):
    """Logits that depend only on each pixel's brightness or on its column.

    Args:
        name, in_channels, base_features, act, dropout: accepted and ignored (the U-Net's arguments).
        out_channels: classes; class ``c`` wins where the first channel is nearest ``c / (K - 1)``
            (binary: foreground where it is above 0.5).
        mode: ``"threshold"`` (the rule above) or ``"ramp"`` (binary only: foreground on the left
            60% of the network's input, whatever the image; its flips disagree, so test-time
            augmentation changes the result in a known way).
    """

    def __init__(
        self,
        name: str = "basic_unet",
        in_channels: int = 3,
        out_channels: int = 2,
        base_features: int = 16,
        act: str = "elu",
        mode: str = "threshold",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.out_channels = int(out_channels)
        self.mode = mode
        self.gain = torch.nn.Parameter(torch.tensor(GAIN))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "ramp":
            width = x.shape[-1]
            column = (torch.arange(width, dtype=x.dtype, device=x.device) + 0.5) / width
            fg = (0.6 - column).expand(x.shape[0], 1, *x.shape[2:]) * self.gain
            return torch.cat([-fg, fg], dim=1)
        g = x[:, :1]
        if self.out_channels == 2:
            fg = (g - 0.5) * self.gain
            return torch.cat([-fg, fg], dim=1)
        centres = torch.linspace(0, 1, self.out_channels, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return -(g - centres).abs() * self.gain


def save_stand_in(path, **kwargs) -> str:
    """Write the stand-in's state dict to ``path`` (a plain state dict, like the bundle's model.pt)."""
    torch.save(StandInNet(**kwargs).state_dict(), path)
    return str(path)
