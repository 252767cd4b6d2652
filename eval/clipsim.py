"""CLIPSIM: mean over frames, then over videos, of cos(CLIP_image(frame), CLIP_text(prompt)).

The raw cosine as in the papers (Make-A-Video on MSR-VTT: 0.3049), not torchmetrics'
CLIPScore (100 × cosine, mean clamped at 0, ViT-L/14 default). ViT-B/32 by default.
Per-video scores are cat states so the value and a bootstrap interval sync across processes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from einops import rearrange
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from eval.sync import ShapedEmptyStates
from models.clip import DEFAULT_CLIP, FrozenCLIP


@dataclass(frozen=True)
class CLIPSIMResult:
    value: float
    low: float | None
    high: float | None
    level: float | None
    num_videos: int
    clip_model: str
    smoke: bool

    def __str__(self) -> str:
        interval = f" [{self.low:.4f}, {self.high:.4f}]" if self.low is not None else ""
        return f"clipsim: {self.value:.4f}{interval}{' (smoke)' if self.smoke else ''}  (N={self.num_videos}, {self.clip_model})"

    def as_dict(self) -> dict:
        return asdict(self)


class CLIPSIM(ShapedEmptyStates, Metric):
    """update(videos uint8 [B,T,H,W,3] (or a list of [T,H,W,3]), prompts[B]); compute() -> mean cosine."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, clip: FrozenCLIP | str = DEFAULT_CLIP, frame_batch: int = 64, **kwargs):
        super().__init__(**kwargs)
        self.clip = FrozenCLIP.load(clip) if isinstance(clip, str) else clip
        self.frame_batch = frame_batch
        self.add_state("scores", [], dist_reduce_fx="cat")  # one mean-over-frames cosine per video

    @property
    def smoke(self) -> bool:
        return self.clip.is_tiny

    def empty_state(self, name: str) -> torch.Tensor:
        return torch.empty(0, dtype=torch.float64, device=self.device)

    def update(self, videos: torch.Tensor | Sequence[torch.Tensor], prompts: Sequence[str],
               names: Sequence[str] | None = None) -> None:
        videos = list(videos) if not isinstance(videos, torch.Tensor) else list(videos.unbind(0))
        if len(videos) != len(prompts):
            raise ValueError(f"CLIPSIM: {len(videos)} videos but {len(prompts)} prompts")
        text, _, _ = self.clip.encode_text(list(prompts))
        for i, (video, t) in enumerate(zip(videos, text)):
            name = names[i] if names else f"video #{i}"
            if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != torch.uint8:
                raise ValueError(f"CLIPSIM {name}: expected uint8 [T,H,W,3], got {video.dtype} {tuple(video.shape)}")
            frames = rearrange(video, "t h w c -> t c h w").float() / 255.0
            image = self.clip.encode_images(frames, batch_size=self.frame_batch)
            score = (image @ t).mean()  # both unit vectors: dot = cosine; raw, no ×100, no clamp
            if not torch.isfinite(score):
                raise ValueError(f"CLIPSIM {name}: similarity is NaN/inf (bad frames or CLIP weights)")
            self.scores.append(score.reshape(1).to(torch.float64))

    def _all_scores(self) -> torch.Tensor:
        if isinstance(self.scores, list) and not self.scores:
            raise ValueError("CLIPSIM: no videos were scored")
        return dim_zero_cat(self.scores)

    def compute(self) -> torch.Tensor:
        return self._all_scores().mean()

    def result(self, num_resamples: int = 1000, level: float = 0.95, seed: int = 0) -> CLIPSIMResult:
        """Value with a percentile bootstrap interval over videos (the mean is unbiased, so no centring)."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync,
                               should_unsync=self._should_unsync):
            scores = self._all_scores().cpu()
        low = high = None
        if scores.numel() >= 2 and num_resamples > 0:
            gen = torch.Generator().manual_seed(seed)
            idx = torch.randint(len(scores), (num_resamples, len(scores)), generator=gen)
            means = scores[idx].mean(1)
            alpha = (1 - level) / 2
            low, high = torch.quantile(means, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
        return CLIPSIMResult(float(scores.mean()), low, high, level if low is not None else None, len(scores),
                             self.clip.name, self.smoke)
