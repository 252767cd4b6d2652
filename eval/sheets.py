"""Pictures of a set of videos for a human: a video grid (all clips tiled, playing together)
and a contact sheet (one row per video, evenly spaced frames)."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange


def fit_square(clip: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [T,H,W,3] -> uint8 [T,size,size,3] (short side to size, centre crop)."""
    x = rearrange(clip, "t h w c -> t c h w").float()
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top : top + size, left : left + size]
    return rearrange(x.round().clamp(0, 255).to(torch.uint8), "t c h w -> t h w c")


GRID_TILE = 128  # the video grid's tile side; clips kept for pictures need no more


def video_grid(clips: Sequence[torch.Tensor], tile: int = GRID_TILE, max_videos: int = 16) -> np.ndarray:
    """Clips (uint8 [T,H,W,3], any sizes) -> one uint8 video [T,rows*tile,cols*tile,3]; the
    shortest clip sets T; empty cells stay black."""
    clips = list(clips)[:max_videos]
    if not clips:
        raise ValueError("video_grid: no clips")
    t = min(c.shape[0] for c in clips)
    tiles = [fit_square(torch.as_tensor(c)[:t], tile) for c in clips]
    cols = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    tiles += [torch.zeros_like(tiles[0])] * (rows * cols - len(tiles))
    grid = rearrange(torch.stack(tiles), "(r c) t h w ch -> t (r h) (c w) ch", r=rows, c=cols)
    return grid.numpy()


def contact_sheet(clips: Sequence[torch.Tensor], frames_per_row: int = 8, tile: int = 96, max_videos: int = 8) -> np.ndarray:
    """One row per clip, `frames_per_row` evenly spaced frames each -> uint8 [H,W,3]."""
    rows = []
    for c in list(clips)[:max_videos]:
        c = torch.as_tensor(c)
        idx = torch.linspace(0, c.shape[0] - 1, min(frames_per_row, c.shape[0])).round().long()
        row = fit_square(c[idx], tile)
        pad = frames_per_row - row.shape[0]
        if pad:
            row = torch.cat([row, torch.zeros(pad, *row.shape[1:], dtype=torch.uint8)])
        rows.append(rearrange(row, "t h w c -> h (t w) c"))
    if not rows:
        raise ValueError("contact_sheet: no clips")
    return torch.cat(rows, dim=0).numpy()
