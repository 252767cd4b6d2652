"""Turn trained image nets into video nets, and widen input convolutions.

`inflate` adds the temporal layers (identity at init) to a trained image U-Net:
the video net's output on a clip equals the image net applied frame by frame.
`widen_input` adds input channels whose weights start at zero (the interpolation
net's masked frames + mask), so the widened net ignores them at step 0.
"""
from __future__ import annotations

import torch

from models.unet import UNet


def load_inflated(video: UNet, image_state: dict[str, torch.Tensor]) -> UNet:
    """Load image weights into a video U-Net; everything it lacks must be temporal."""
    missing, unexpected = video.load_state_dict(image_state, strict=False)
    not_temporal = [k for k in missing if "temporal" not in k]
    if not_temporal or unexpected:
        raise ValueError(f"image weights do not fit the video net: missing {not_temporal[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return video


def inflate(image: UNet) -> UNet:
    """A video U-Net (temporal layers added, identity at init) with the image net's weights."""
    if image.temporal:
        raise ValueError("the net already has temporal layers")
    video = UNet(**{**image.kwargs, "temporal": True})
    return load_inflated(video, image.state_dict()).to(next(image.parameters()).device)


def widen_input(state: dict[str, torch.Tensor], in_channels: int, key: str = "conv_in.spatial.weight") -> dict:
    """Zero-pad the input conv of a state dict to `in_channels` (new channels appended last)."""
    weight = state[key]
    extra = in_channels - weight.shape[1]
    if extra < 0:
        raise ValueError(f"cannot narrow {key} from {weight.shape[1]} to {in_channels} channels")
    pad = torch.zeros(weight.shape[0], extra, *weight.shape[2:], dtype=weight.dtype, device=weight.device)
    return {**state, key: torch.cat([weight, pad], dim=1)}
