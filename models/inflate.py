"""Turn trained image nets into video nets, and widen input convolutions.

`inflate` adds the temporal layers (identity at init) to a trained image U-Net:
the video net's output on a clip equals the image net applied frame by frame.
`widen_input` adds input channels whose weights start at zero (the interpolation
net's masked frames + mask), so the widened net ignores them at step 0.
"""
from __future__ import annotations

import torch

from models.compat import state_misfits
from models.unet import UNet


def temporal_misfits(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> list[str]:
    """What stops `state` loading into a net whose state is `own`, where only the temporal layers
    may be missing (they start as the identity: inflation)."""
    return state_misfits(own, state, may_miss=lambda key: "temporal" in key)


def load_inflated(video: UNet, image_state: dict[str, torch.Tensor]) -> UNet:
    """Load image weights into a video U-Net; everything it lacks must be temporal."""
    problems = temporal_misfits(video.state_dict(), image_state)
    if problems:
        raise ValueError(f"image weights do not fit the video net: {'; '.join(problems)}")
    video.load_state_dict(image_state, strict=False)
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
