"""Inception Score for video (UCF-101): C3D class probabilities, KL in float64, 10 splits.

C3D is the Tran et al. (2015) network (8 convs, 5 pools, fc6/fc7 4096, fc8 = classes) with
module names conv1 … conv5b, fc6, fc7, fc8 as in the common PyTorch port, so a state dict
converted to that layout loads with strict keys. Weights come from a path/URL with sha256
(eval.weights); there is no download of the UCF-101-finetuned weights here.
CAVEAT: the TGANv2 protocol's own weights are a Chainer .npz with its own input
normalisation; converting them to this layout and matching their preprocessing has not
been validated, so IS from here is not yet comparable with published numbers.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from eval.sync import ShapedEmptyStates
from eval.weights import load_state_dict, resolve_weights


class C3D(nn.Module):
    def __init__(self, num_classes: int = 101):
        super().__init__()
        conv = lambda i, o: nn.Conv3d(i, o, 3, padding=1)  # noqa: E731
        self.conv1, self.conv2 = conv(3, 64), conv(64, 128)
        self.conv3a, self.conv3b = conv(128, 256), conv(256, 256)
        self.conv4a, self.conv4b = conv(256, 512), conv(512, 512)
        self.conv5a, self.conv5b = conv(512, 512), conv(512, 512)
        self.fc6, self.fc7, self.fc8 = nn.Linear(8192, 4096), nn.Linear(4096, 4096), nn.Linear(4096, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B,3,16,112,112] -> logits [B,classes]."""
        x = F.max_pool3d(F.relu(self.conv1(x)), (1, 2, 2))
        x = F.max_pool3d(F.relu(self.conv2(x)), 2)
        x = F.max_pool3d(F.relu(self.conv3b(F.relu(self.conv3a(x)))), 2)
        x = F.max_pool3d(F.relu(self.conv4b(F.relu(self.conv4a(x)))), 2)
        x = F.max_pool3d(F.relu(self.conv5b(F.relu(self.conv5a(x)))), 2, padding=(0, 1, 1))
        x = F.relu(self.fc7(F.relu(self.fc6(x.flatten(1)))))
        return self.fc8(x)


def load_c3d(weights=None, sha256=None, num_classes=101, device="cpu", seed=0) -> tuple[C3D, bool, str]:
    """-> (model, smoke, checksum). No weights: random (smoke)."""
    if weights is None:
        with torch.random.fork_rng(devices=[]):  # the same smoke weights for a seed; the caller's RNG untouched
            torch.manual_seed(seed)
            net = C3D(num_classes)
        return net.eval().to(device), True, "random"
    net = C3D(num_classes)
    path, digest = resolve_weights(weights, sha256)
    state = load_state_dict(path, weights)
    own = net.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    misshaped = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or misshaped:
        raise ValueError(f"weights {weights}: not a C3D({num_classes}) state dict (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, other shapes {misshaped[:3]})")
    net.load_state_dict(state)
    return net.eval().to(device), False, digest


def c3d_preprocess(videos: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [B,16,H,W,3] -> [B,3,16,112,112] float in 0..255 minus the per-channel mean."""
    b = videos.shape[0]
    x = rearrange(videos, "b t h w c -> (b t) c h w").float()
    x = F.interpolate(x, size=(112, 112), mode="bilinear", align_corners=False)
    if mean is not None:
        x = x - mean.view(1, 3, 1, 1).to(x)
    return rearrange(x, "(b t) c h w -> b c t h w", b=b)


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """torch-fidelity style: softmax of logits, KL(p(y|x) || p(y)) per split in float64; mean, std."""
    p = F.softmax(logits.to(torch.float64), dim=1)
    n = len(p)
    if n < splits:
        raise ValueError(f"inception score: {n} samples for {splits} splits")
    scores = []
    for i in range(splits):
        part = p[i * n // splits : (i + 1) * n // splits]
        py = part.mean(0, keepdim=True)
        kl = (part * (part.clamp_min(1e-30).log() - py.clamp_min(1e-30).log())).sum(1).mean()
        scores.append(kl.exp())
    s = torch.stack(scores)
    return float(s.mean()), float(s.std(unbiased=False))


@dataclass(frozen=True)
class ISResult:
    value: float  # mean over splits
    std: float  # over splits
    num_videos: int
    splits: int
    smoke: bool

    def as_dict(self) -> dict:
        return asdict(self)


class VideoInceptionScore(ShapedEmptyStates, Metric):
    """update(uint8 [B,16,H,W,3]); compute() -> (mean, std) over `splits` splits."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, c3d: C3D, smoke: bool, splits: int = 10, mean: torch.Tensor | None = None, **kwargs):
        super().__init__(**kwargs)
        self.c3d, self.smoke, self.splits, self.mean = c3d.eval().requires_grad_(False), smoke, splits, mean
        self.add_state("logits", [], dist_reduce_fx="cat")

    def empty_state(self, name: str) -> torch.Tensor:
        return torch.empty(0, self.c3d.fc8.out_features, dtype=torch.float64, device=self.c3d.fc8.weight.device)

    @torch.no_grad()
    def update(self, videos: torch.Tensor) -> None:
        if videos.ndim != 5 or videos.shape[1] != 16 or videos.dtype != torch.uint8:
            raise ValueError(f"IS expects uint8 [B,16,H,W,3] (C3D takes 16 frames), got {videos.dtype} {tuple(videos.shape)}")
        device = next(self.c3d.parameters()).device
        self.logits.append(self.c3d(c3d_preprocess(videos.to(device), self.mean)).double())

    def compute(self):
        return inception_score(dim_zero_cat(self.logits), self.splits)

    def result(self) -> ISResult:
        """compute() as an ISResult (synced across processes). Fewer than 2 videos per split gives
        fewer splits (a split of one video always scores 1)."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync,
                               should_unsync=self._should_unsync):
            logits = dim_zero_cat(self.logits) if len(self.logits) else torch.zeros(0)
        if len(logits) < 2:
            raise ValueError(f"inception score needs at least 2 videos, got {len(logits)}")
        splits = min(self.splits, len(logits) // 2)
        return ISResult(*inception_score(logits, splits), len(logits), splits, self.smoke)
