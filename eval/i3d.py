"""I3D (Inception-v1, Kinetics-400) feature extractors for FVD.

Two detectors give the same thing, the 400-d Kinetics logits averaged over time:

* `InceptionI3d`: plain PyTorch in the piergiaj/pytorch-i3d layout, so the
  `i3d_pretrained_400.pt` state dict used by VideoGPT, TATS and cd-fvd loads
  with strict key matching (`Conv3d_1a_7x7.conv3d.weight`, `Mixed_3b.b1b.bn.running_var`,
  `logits.conv3d.bias`, ...). Input [B,3,T,224,224] in [-1,1]; T >= 9.
* `TorchScriptI3D`: StyleGAN-V's `i3d_torchscript.pt`, which does its own
  rescale and resize when called with rescale=True, resize=True.

Both are wrapped by `I3DDetector`, whose input is uint8 video [B,T,H,W,3] of any
frame size; `load_i3d(weights)` picks the right one, or random weights (smoke).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from eval.weights import (check_state_fits, is_torchscript, load_state_dict, load_torchscript, module_device,
                          resolve_weights)

MIN_FRAMES = 9  # temporal stride 8 plus the 2-frame average pool at the end
INPUT_SIZE = 224
NUM_CLASSES = 400


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (front, back) for one dimension."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel, stride) -> torch.Tensor:
    pads = []
    for size, k, s in zip(reversed(x.shape[-3:]), reversed(kernel), reversed(stride)):
        pads += _same_pad(size, k, s)
    return F.pad(x, pads) if any(pads) else x


class Unit3D(nn.Module):
    """Conv3d (+ BatchNorm, eps 1e-5 as in the converted weights) (+ ReLU), TF 'SAME' padding."""

    def __init__(self, cin, cout, kernel=(1, 1, 1), stride=(1, 1, 1), relu=True, batch_norm=True, bias=False):
        super().__init__()
        self.kernel, self.stride, self.relu = tuple(kernel), tuple(stride), relu
        # With stride 1 and odd kernels SAME padding is symmetric and input-independent:
        # let the conv pad (no extra copy). Otherwise pad dynamically in forward.
        self.static = all(s == 1 and k % 2 == 1 for k, s in zip(self.kernel, self.stride))
        padding = tuple((k - 1) // 2 for k in self.kernel) if self.static else 0
        self.conv3d = nn.Conv3d(cin, cout, self.kernel, self.stride, padding=padding, bias=bias)
        if batch_norm:
            self.bn = nn.BatchNorm3d(cout, eps=1e-5, momentum=0.001)

    def forward(self, x):
        if not self.static:
            x = _pad_same(x, self.kernel, self.stride)
        x = self.conv3d(x)
        if hasattr(self, "bn"):
            x = self.bn(x)
        return F.relu(x) if self.relu else x


class MaxPool3dSame(nn.Module):
    """Max pool with TF 'SAME' zero padding (inputs are post-ReLU, so zeros never win wrongly)."""

    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)

    def forward(self, x):
        return F.max_pool3d(_pad_same(x, self.kernel, self.stride), self.kernel, self.stride)


class InceptionModule(nn.Module):
    """Four branches: 1x1 | 1x1→3x3 | 1x1→3x3 | 3x3 max pool→1x1, concatenated on channels."""

    def __init__(self, cin: int, c: list[int]):
        super().__init__()
        self.b0 = Unit3D(cin, c[0])
        self.b1a, self.b1b = Unit3D(cin, c[1]), Unit3D(c[1], c[2], (3, 3, 3))
        self.b2a, self.b2b = Unit3D(cin, c[3]), Unit3D(c[3], c[4], (3, 3, 3))
        # stride-1 3x3x3 pool on non-negative inputs: -inf padding == SAME zero padding
        self.b3a = nn.MaxPool3d(3, stride=1, padding=1)
        self.b3b = Unit3D(cin, c[5])
        self.out_channels = c[0] + c[2] + c[4] + c[5]

    def forward(self, x):
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


class InceptionI3d(nn.Module):
    """Inception-v1 I3D; module names match the piergiaj/pytorch-i3d state dict."""

    ENDPOINTS = (
        ("Conv3d_1a_7x7", lambda: Unit3D(3, 64, (7, 7, 7), (2, 2, 2))),
        ("MaxPool3d_2a_3x3", lambda: MaxPool3dSame((1, 3, 3), (1, 2, 2))),
        ("Conv3d_2b_1x1", lambda: Unit3D(64, 64)),
        ("Conv3d_2c_3x3", lambda: Unit3D(64, 192, (3, 3, 3))),
        ("MaxPool3d_3a_3x3", lambda: MaxPool3dSame((1, 3, 3), (1, 2, 2))),
        ("Mixed_3b", lambda: InceptionModule(192, [64, 96, 128, 16, 32, 32])),
        ("Mixed_3c", lambda: InceptionModule(256, [128, 128, 192, 32, 96, 64])),
        ("MaxPool3d_4a_3x3", lambda: MaxPool3dSame((3, 3, 3), (2, 2, 2))),
        ("Mixed_4b", lambda: InceptionModule(480, [192, 96, 208, 16, 48, 64])),
        ("Mixed_4c", lambda: InceptionModule(512, [160, 112, 224, 24, 64, 64])),
        ("Mixed_4d", lambda: InceptionModule(512, [128, 128, 256, 24, 64, 64])),
        ("Mixed_4e", lambda: InceptionModule(512, [112, 144, 288, 32, 64, 64])),
        ("Mixed_4f", lambda: InceptionModule(528, [256, 160, 320, 32, 128, 128])),
        ("MaxPool3d_5a_2x2", lambda: MaxPool3dSame((2, 2, 2), (2, 2, 2))),
        ("Mixed_5b", lambda: InceptionModule(832, [256, 160, 320, 32, 128, 128])),
        ("Mixed_5c", lambda: InceptionModule(832, [384, 192, 384, 48, 128, 128])),
    )

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        for name, make in self.ENDPOINTS:
            self.add_module(name, make())
        self.avg_pool = nn.AvgPool3d((2, 7, 7), stride=1)
        self.dropout = nn.Dropout(0.5)
        self.logits = Unit3D(1024, num_classes, relu=False, batch_norm=False, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B,3,T,224,224] in [-1,1] -> [B,num_classes] logits averaged over time."""
        for name, _ in self.ENDPOINTS:
            x = self._modules[name](x)
        x = self.logits(self.dropout(self.avg_pool(x)))  # [B,C,T',1,1] at 224x224 input
        return x.mean(dim=(2, 3, 4))

    def init_random(self, seed: int = 0) -> "InceptionI3d":
        """Smoke-mode weights: He-normal convs keep activations alive through 50+ layers,
        so random features still vary with the input (default init makes them ~constant)."""
        gen = torch.Generator().manual_seed(seed)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                fan_in = m.weight[0].numel()
                with torch.no_grad():
                    m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * math.sqrt(2.0 / fan_in))
                    if m.bias is not None:
                        m.bias.zero_()
        return self


def reference_preprocess(videos: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """uint8 [B,T,H,W,3] -> float [B,3,T,size,size] in [-1,1]: bilinear (align_corners=False,
    no antialias, every frame squashed to a square, no crop) as in the reference FVD code."""
    b = videos.shape[0]
    frames = rearrange(videos, "b t h w c -> (b t) c h w")
    if frames.shape[-2:] != (size, size):  # in chunks of frames: a batch of full-HD clips in float is GBs
        frames = torch.cat([F.interpolate(chunk.float(), size=(size, size), mode="bilinear", align_corners=False)
                            for chunk in frames.split(32)])
    frames = frames.float() * (2.0 / 255.0) - 1.0
    return rearrange(frames, "(b t) c h w -> b c t h w", b=b)


class TorchScriptI3D(nn.Module):
    """StyleGAN-V's TorchScript I3D: takes uint8 [B,3,T,H,W], rescales and resizes itself."""

    def __init__(self, scripted: torch.jit.ScriptModule):
        super().__init__()
        self.scripted = scripted.eval()

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        x = rearrange(videos, "b t h w c -> b c t h w").contiguous()
        feats = self.scripted(x, rescale=True, resize=True, return_features=True)
        return feats.reshape(feats.shape[0], -1)


class I3DDetector(nn.Module):
    """uint8 video [B,T,H,W,3] (any T >= 9, any frame size) -> float32 features [B,400].

    Runs in batches of `batch_size`; `amp_dtype=torch.bfloat16` runs the network under
    autocast on CUDA (features come back float32; statistics are float64 downstream).
    Without amp, cuDNN's TF32 convolutions are switched off (`allow_tf32=False`): they
    move features by ~1e-3 relative, and fp32 is meant to match the reference.
    """

    def __init__(self, net: nn.Module, kind: str, name: str, checksum: str | None, smoke: bool,
                 batch_size: int = 32, amp_dtype: torch.dtype | None = None, channels_last: bool = False,
                 allow_tf32: bool = False):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.kind, self.name, self.checksum, self.smoke = kind, name, checksum, smoke
        self.batch_size, self.amp_dtype, self.channels_last = batch_size, amp_dtype, channels_last
        self.allow_tf32 = allow_tf32
        self.feature_dim = NUM_CLASSES
        if channels_last and kind == "state_dict":
            self.net.to(memory_format=torch.channels_last_3d)

    def train(self, mode: bool = True):  # a detector never trains (dropout, BN stay in eval)
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return module_device(self.net)

    def describe(self) -> dict:
        return {"detector": self.kind, "detector_name": self.name, "detector_sha256": self.checksum or "random",
                "smoke": self.smoke}

    @torch.no_grad()
    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        if videos.ndim != 5 or videos.shape[-1] != 3:
            raise ValueError(f"I3D expects uint8 video [B,T,H,W,3], got shape {tuple(videos.shape)}")
        if videos.dtype != torch.uint8:
            raise TypeError(f"I3D expects uint8 video (0..255), got {videos.dtype}")
        if videos.shape[1] < MIN_FRAMES:
            raise ValueError(f"I3D needs at least {MIN_FRAMES} frames per clip (temporal stride 8), got {videos.shape[1]}")
        outs = []
        for chunk in videos.split(self.batch_size):
            outs.append(self._run(chunk.to(self.device, non_blocking=True)))
        return torch.cat(outs)

    def _run(self, chunk: torch.Tensor) -> torch.Tensor:
        use_amp = self.amp_dtype is not None and chunk.device.type == "cuda"
        cudnn = torch.backends.cudnn
        with torch.autocast(chunk.device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=use_amp), \
                cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                            allow_tf32=self.allow_tf32 or use_amp):
            if self.kind == "torchscript":
                return self.net(chunk).float()
            x = reference_preprocess(chunk)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            return self.net(x).float()


def _not_features(scripted: torch.jit.ScriptModule, video: torch.Tensor) -> str | None:
    """Why the TorchScript module's output for one video is not StyleGAN-V's I3D features, if it is not."""
    feats = scripted(video, rescale=True, resize=True, return_features=True)  # as TorchScriptI3D calls it
    shape = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
    return None if shape == (1, NUM_CLASSES) else f"gives {shape} for one video, not [1, {NUM_CLASSES}] features"


def read_i3d_weights(weights: str | Path, sha256: str | None = None,
                     device: str | torch.device = "cpu") -> tuple[torch.jit.ScriptModule | dict, str]:
    """(StyleGAN-V's TorchScript module or a state dict in the piergiaj layout, sha256) of `weights`,
    a path or URL; anything else is an error naming them. `mav evaluate` checks its weights with it
    before any long work; load_i3d builds the detector from it."""
    path, digest = resolve_weights(weights, sha256)
    if is_torchscript(path):
        return load_torchscript(path, weights, "i3d_torchscript.pt", device, _not_features), digest
    with torch.device("meta"):  # the names and shapes, without building the weights
        own = InceptionI3d().state_dict()
    state = check_state_fits(load_state_dict(path, weights), own, weights,  # e.g. a Charades (157-class) head
                             "an InceptionI3d(400) state dict in the piergiaj layout",
                             may_miss=lambda key: key.endswith("num_batches_tracked"))
    return state, digest


def load_i3d(weights: str | Path | None = None, sha256: str | None = None, device: str | torch.device = "cpu",
             seed: int = 0, **detector_kwargs) -> I3DDetector:
    """I3D from a state dict (`i3d_pretrained_400.pt`) or a TorchScript file (`i3d_torchscript.pt`),
    given as a path or URL and checked against `sha256` when given; no weights -> smoke mode."""
    if weights is None:
        net = InceptionI3d().init_random(seed)
        return I3DDetector(net, "state_dict", f"random-i3d(seed={seed})", None, True, **detector_kwargs).to(device)
    loaded, digest = read_i3d_weights(weights, sha256, device)
    if isinstance(loaded, torch.jit.ScriptModule):
        return I3DDetector(TorchScriptI3D(loaded), "torchscript", str(weights), digest, False, **detector_kwargs).to(device)
    net = InceptionI3d()
    net.load_state_dict(loaded, strict=False)
    return I3DDetector(net, "state_dict", str(weights), digest, False, **detector_kwargs).to(device)
