"""Inception Score for video (UCF-101): C3D class probabilities, KL in float64, 10 splits
(of a seeded shuffle, as StyleGAN-V splits them).

Two classifiers give the class scores of uint8 video [B,16,H,W,3]:

* `C3D`: the Tran et al. (2015) network (8 convs, 5 pools, fc6/fc7 4096, fc8 = classes) with
  module names conv1 … conv5b, fc6, fc7, fc8 as in the common PyTorch port, so a state dict
  converted to that layout loads with strict keys; frames resized to 112x112, 0..255 RGB.
* `TorchScriptC3D`: StyleGAN-V's `c3d_ucf101.pt`, its TorchScript copy of TGANv2's
  UCF-101-finetuned C3D (Chainer), preprocessing inside, which StyleGAN-V reports reproduces the
  original exactly: the classifier of the published UCF-101 IS numbers. It takes uint8
  [B,3,16,H,W] and gives probabilities.

Weights come from a path/URL with sha256 (eval.weights); nothing is downloaded here, so neither
has been checked against published numbers on this machine.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from eval.sync import ShapedEmptyStates
from eval.weights import (check_state_fits, is_torchscript, load_state_dict, load_torchscript, module_device,
                          resolve_weights)


class C3D(nn.Module):
    kind = "state_dict"
    frame_size = "112x112 bilinear"

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

    @property
    def num_classes(self) -> int:
        return self.fc8.out_features

    def classify(self, videos: torch.Tensor) -> torch.Tensor:
        """uint8 [B,16,H,W,3] -> logits [B,classes]."""
        return self(c3d_preprocess(videos))


class TorchScriptC3D(nn.Module):
    """StyleGAN-V's TorchScript C3D (`c3d_ucf101.pt`): uint8 [B,3,16,H,W] in, class probabilities
    out, as StyleGAN-V's compute_isv calls it; it resizes and normalises itself."""

    kind = "torchscript"
    frame_size = "the TorchScript's own"

    def __init__(self, scripted: torch.jit.ScriptModule, name: str, num_classes: int = 101):
        super().__init__()
        self.scripted, self.name, self.num_classes = scripted.eval(), name, num_classes

    def classify(self, videos: torch.Tensor) -> torch.Tensor:
        """uint8 [B,16,H,W,3] -> log-probabilities [B,classes] (their softmax is the probabilities)."""
        probs = self.scripted(rearrange(videos, "b t h w c -> b c t h w").contiguous()).double()
        if why := not_probabilities(probs, len(videos), self.num_classes):  # checked on one video as it loaded
            raise ValueError(f"weights {self.name}: {why}; expected StyleGAN-V's c3d_ucf101.pt")
        return probs.clamp_min(1e-30).log()


def not_probabilities(probs: torch.Tensor, n: int, num_classes: int) -> str | None:
    """Why a classifier's output for n videos is not [n, num_classes] class probabilities, if it is not."""
    if tuple(probs.shape) != (n, num_classes):
        return f"gives {tuple(probs.shape)} for {n} video{'s' * (n != 1)}, not [{n}, {num_classes}] class probabilities"
    if (probs < 0).any() or not torch.allclose(probs.double().sum(1), probs.new_ones(n, dtype=torch.float64),
                                               atol=1e-3):
        return "its outputs are not class probabilities (negative, or rows not summing to 1)"
    return None


def read_c3d_weights(weights, sha256=None, num_classes=101, device="cpu") -> tuple[torch.jit.ScriptModule | dict, str]:
    """(StyleGAN-V's TorchScript module or a state dict in the port's layout, sha256) of `weights`,
    a path or URL; anything else is an error naming them. `mav evaluate` checks its weights with it
    before any long work; load_c3d builds the classifier from it."""
    path, digest = resolve_weights(weights, sha256)
    if is_torchscript(path):
        def problem(scripted, video):  # as TorchScriptC3D.classify calls it: the video alone
            return not_probabilities(scripted(video), 1, num_classes)

        return load_torchscript(path, weights, "c3d_ucf101.pt", device, problem), digest
    with torch.device("meta"):  # the names and shapes, without building the weights
        own = C3D(num_classes).state_dict()
    state = check_state_fits(load_state_dict(path, weights), own, weights, f"a C3D({num_classes}) state dict")
    return state, digest


def load_c3d(weights=None, sha256=None, num_classes=101, device="cpu", seed=0) -> tuple[nn.Module, bool, str]:
    """C3D from a state dict in the port's layout or StyleGAN-V's TorchScript file, given as a path
    or URL -> (classifier, smoke, checksum). No weights: random (smoke)."""
    if weights is None:
        with torch.random.fork_rng(devices=[]):  # the same smoke weights for a seed; the caller's RNG untouched
            torch.manual_seed(seed)
            net = C3D(num_classes)
        return net.eval().to(device), True, "random"
    loaded, digest = read_c3d_weights(weights, sha256, num_classes, device)
    if isinstance(loaded, torch.jit.ScriptModule):
        return TorchScriptC3D(loaded, str(weights), num_classes).to(device), False, digest
    net = C3D(num_classes)
    net.load_state_dict(loaded)
    return net.eval().to(device), False, digest


def c3d_preprocess(videos: torch.Tensor) -> torch.Tensor:
    """uint8 [B,16,H,W,3] -> [B,3,16,112,112] float in 0..255."""
    b = videos.shape[0]
    x = rearrange(videos, "b t h w c -> (b t) c h w").float()
    x = F.interpolate(x, size=(112, 112), mode="bilinear", align_corners=False)
    return rearrange(x, "(b t) c h w -> b c t h w", b=b)


def inception_score(logits: torch.Tensor, splits: int = 10, shuffle_seed: int | None = 42) -> tuple[float, float]:
    """Softmax of logits, KL(p(y|x) || p(y)) per split in float64; mean, std over the splits.
    The splits are of the videos in a seeded shuffle, StyleGAN-V's (NumPy's RandomState(42)), so
    their order cannot put few classes in a split (a folder of fakes sorted by class)."""
    p = F.softmax(logits.to(torch.float64), dim=1)
    n = len(p)
    if n < splits:
        raise ValueError(f"inception score: {n} samples for {splits} splits")
    if shuffle_seed is not None:
        p = p[torch.from_numpy(np.random.RandomState(shuffle_seed).permutation(n)).to(p.device)]
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

    def __init__(self, c3d: C3D | TorchScriptC3D, smoke: bool, splits: int = 10, **kwargs):
        super().__init__(**kwargs)
        self.c3d, self.smoke, self.splits = c3d.eval().requires_grad_(False), smoke, splits
        self.add_state("logits", [], dist_reduce_fx="cat")

    def train(self, mode: bool = True):  # the classifier never trains (a TorchScript C3D's dropout stays off)
        return super().train(False)

    def empty_state(self, name: str) -> torch.Tensor:
        return torch.empty(0, self.c3d.num_classes, dtype=torch.float64, device=module_device(self.c3d))

    @torch.no_grad()
    def update(self, videos: torch.Tensor) -> None:
        if videos.ndim != 5 or videos.shape[1] != 16 or videos.dtype != torch.uint8:
            raise ValueError(f"IS expects uint8 [B,16,H,W,3] (C3D takes 16 frames), got {videos.dtype} {tuple(videos.shape)}")
        self.logits.append(self.c3d.classify(videos.to(module_device(self.c3d))).double())

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
