"""Fréchet Video Distance as a torchmetrics Metric.

    fvd = FrechetVideoDistance(load_i3d(weights))       # no weights -> smoke mode
    fvd.update(real_uint8_btHwc, real=True); fvd.update(fake, real=False)
    fvd.compute()                                        # float64 scalar
    fvd.result()                                         # FVDResult: value, bootstrap interval, settings

States are float64 Σx, ΣxxT and counts with sum reduction, so `compute` syncs
across processes (DDP) exactly; per-sample features are kept as cat states
only when `keep_features=True` (needed for the bootstrap interval).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from eval.frechet import bootstrap_interval, frechet_distance, mean_cov_from_sums
from eval.i3d import MIN_FRAMES, I3DDetector
from eval.sync import ShapedEmptyStates


@dataclass(frozen=True)
class FVDResult:
    value: float
    low: float | None
    high: float | None
    level: float | None
    num_real: int
    num_fake: int
    clip_length: int | None
    clip_stride: int
    unbiased: bool
    detector: str
    detector_sha256: str
    smoke: bool
    clip_fps: float | None = None  # the clips' frame rate (videos resampled to it); None: as decoded

    def __str__(self) -> str:
        interval = f" [{self.low:.4g}, {self.high:.4g}]" if self.low is not None else ""
        smoke = " (smoke)" if self.smoke else ""
        at = f" at {self.clip_fps:g} fps" if self.clip_fps is not None else ""
        return (f"fvd: {self.value:.4g}{interval}{smoke}  "
                f"(N={self.num_real}+{self.num_fake}, {self.clip_length} frames{at}, stride {self.clip_stride})")

    def as_dict(self) -> dict:
        return asdict(self)


def _names(names: Sequence[str] | None, idx, prefix: str) -> list[str]:
    return [names[i] if names else f"{prefix} video #{i}" for i in idx]


class FrechetVideoDistance(ShapedEmptyStates, Metric):
    """FVD between real and fake uint8 videos [B,T,H,W,3] using I3D logits (400-d)."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, detector: I3DDetector | None = None, feature_dim: int = 400, unbiased: bool = False,
                 keep_features: bool = True, clip_stride: int = 1, clip_fps: float | None = None, **kwargs):
        super().__init__(**kwargs)
        self.detector = detector
        self.feature_dim = detector.feature_dim if detector is not None else feature_dim
        self.unbiased, self.keep_features, self.clip_stride = unbiased, keep_features, clip_stride
        self.clip_fps = clip_fps  # (described with the result, as the stride is)
        # clip length T of every update: states, so reset() clears them and processes and merges
        # compare them (min == max)
        self.add_state("length_min", torch.tensor(float("inf"), dtype=torch.float64), dist_reduce_fx="min")
        self.add_state("length_max", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="max")
        d = self.feature_dim
        for side in ("real", "fake"):
            self.add_state(f"{side}_sum", torch.zeros(d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_outer", torch.zeros(d, d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_n", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
            if keep_features:
                self.add_state(f"{side}_features", [], dist_reduce_fx="cat")

    @property
    def smoke(self) -> bool:
        return bool(self.detector is None or self.detector.smoke)

    # -- update -----------------------------------------------------------------
    def update(self, videos: torch.Tensor | Sequence[torch.Tensor] | None = None, real: bool = True,
               names: Sequence[str] | None = None, features: torch.Tensor | None = None) -> None:
        """Add a batch: uint8 tensor [B,T,H,W,3], or a list of [T,H,W,3] of one size; or
        precomputed detector `features` [B,D]. `names` (e.g. file paths) make errors point at the input."""
        side = "real" if real else "fake"
        if features is None:
            features = self._features(videos, names, side)
        self._add_features(features, side, names)

    def update_features(self, features: torch.Tensor, real: bool, names: Sequence[str] | None = None) -> None:
        """Add precomputed detector features [B, D] (e.g. from a cache)."""
        self.update(real=real, names=names, features=features)

    def _features(self, videos, names, side) -> torch.Tensor:
        if self.detector is None:
            raise RuntimeError("FrechetVideoDistance has no detector: pass load_i3d(...) or give features=")
        if not isinstance(videos, torch.Tensor):
            videos = self._stack(list(videos), names, side)
        if videos.ndim != 5 or videos.shape[-1] != 3:
            raise ValueError(f"{side} videos: expected uint8 [B,T,H,W,3], got shape {tuple(videos.shape)}")
        if videos.dtype != torch.uint8:
            raise TypeError(f"{side} videos: expected uint8 0..255 (the reference FVD input), got {videos.dtype}")
        t = videos.shape[1]
        if t < MIN_FRAMES:
            raise ValueError(f"{', '.join(_names(names, range(len(videos)), side))}: {t} frames; "
                             f"I3D needs clips of at least {MIN_FRAMES} frames")
        self._check_clip_length(t, names, side)
        return self.detector(videos)

    def _stack(self, videos: list[torch.Tensor], names, side) -> torch.Tensor:
        shapes = [tuple(v.shape) for v in videos]
        if len(set(shapes)) > 1:
            bad = [i for i, s in enumerate(shapes) if s != shapes[0]]
            listing = ", ".join(f"{n} {shapes[i]}" for n, i in zip(_names(names, bad, side), bad))
            raise ValueError(f"{side} videos have mixed shapes: first is {shapes[0]}, but {listing}; "
                             "resize or clip them to one size and length before batching")
        return torch.stack(videos)

    @property
    def clip_length(self) -> int | None:
        return int(self.length_max) if self.length_max > 0 else None

    def empty_state(self, name: str) -> torch.Tensor:
        return torch.empty(0, self.feature_dim, dtype=torch.float64, device=self.real_sum.device)

    def _check_clip_length(self, t: int, names, side) -> None:
        if self.clip_length is None:
            self.length_min.fill_(t)
            self.length_max.fill_(t)
        elif t != self.clip_length:
            who = ", ".join(_names(names, range(1), side)) if names else f"a {side} batch"
            raise ValueError(f"{who}: clips of {t} frames, but earlier clips had {self.clip_length}; "
                             "FVD compares clips of one length")

    def _add_features(self, features: torch.Tensor, side: str, names) -> None:
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"{side} features: expected [B,{self.feature_dim}], got {tuple(features.shape)}")
        f = features.to(self.real_sum.device, torch.float64)
        bad = (~torch.isfinite(f)).any(dim=1)
        if bad.any():
            idx = bad.nonzero().flatten().tolist()
            raise ValueError(f"{side} features contain NaN/inf for {', '.join(_names(names, idx, side))}; "
                             "check the input frames and the detector weights")
        setattr(self, f"{side}_sum", getattr(self, f"{side}_sum") + f.sum(0))
        setattr(self, f"{side}_outer", getattr(self, f"{side}_outer") + f.T @ f)
        setattr(self, f"{side}_n", getattr(self, f"{side}_n") + len(f))
        if self.keep_features:
            getattr(self, f"{side}_features").append(f)

    # -- compute ----------------------------------------------------------------
    def _stats(self, side: str):
        n = int(getattr(self, f"{side}_n").item())
        if n < 2:
            raise ValueError(f"FVD needs at least 2 {side} videos to estimate a covariance, got {n}")
        return mean_cov_from_sums(n, getattr(self, f"{side}_sum"), getattr(self, f"{side}_outer"), self.unbiased)

    def compute(self) -> torch.Tensor:
        return frechet_distance(*self._stats("real"), *self._stats("fake"))

    def result(self, num_resamples: int = 100, level: float = 0.95, seed: int = 0) -> FVDResult:
        """The value with a bootstrap interval (if features are kept) and the settings behind it.
        Synced across processes like compute()."""
        low = high = None
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync,
                               should_unsync=self._should_unsync):
            if self.length_max > 0 and self.length_min != self.length_max:
                raise ValueError(f"FVD compares clips of one length, but the processes or merged metrics scored "
                                 f"clips of {int(self.length_min)} to {int(self.length_max)} frames")
            value = float(frechet_distance(*self._stats("real"), *self._stats("fake")))
            n_real, n_fake = int(self.real_n.item()), int(self.fake_n.item())
            clip_length = self.clip_length
            if self.keep_features and num_resamples > 0:
                ci = bootstrap_interval(dim_zero_cat(self.real_features), dim_zero_cat(self.fake_features),
                                        self.unbiased, num_resamples, level, seed)
                low, high = ci.low, ci.high
        info = self.detector.describe() if self.detector is not None else {"detector_name": "features", "detector_sha256": "n/a"}
        return FVDResult(value, low, high, level if low is not None else None, n_real, n_fake, clip_length,
                         self.clip_stride, self.unbiased, info["detector_name"], info["detector_sha256"], self.smoke,
                         self.clip_fps)
