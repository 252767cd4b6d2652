"""Scene cut detection with PySceneDetect, fed frame by frame from our own decode pass."""
from __future__ import annotations

import math
from collections import deque
from fractions import Fraction

import cv2
import numpy as np
from scenedetect import AdaptiveDetector, ContentDetector, FrameTimecode, HashDetector, HistogramDetector

from data_prep.config import SceneConfig


# detector name -> (class, the keyword its threshold goes by)
DETECTORS = {"content": (ContentDetector, "threshold"), "adaptive": (AdaptiveDetector, "adaptive_threshold"),
             "histogram": (HistogramDetector, "threshold"), "hash": (HashDetector, "threshold")}


def make_detector(cfg: SceneConfig, fps: float):
    # min_scene_len 0 (our default) reports every cut: merging close cuts would join a short shot to
    # its neighbours in one clip. Clip lengths are set by our own filter (min/max scene, trim).
    cls, threshold_kw = DETECTORS[cfg.detector]
    kwargs = {threshold_kw: cfg.threshold} if cfg.threshold is not None else {}
    return cls(min_scene_len=cfg.detector_min_frames, **kwargs)


class CutDetector:
    """Push frames in decode order; get back the frame numbers where new shots start."""

    def __init__(self, cfg: SceneConfig, fps: float):
        self.detector = make_detector(cfg, fps)
        self.fps = Fraction(fps).limit_denominator(100000) if fps > 0 else Fraction(25)
        self.last = -1

    @property
    def lag(self) -> int:
        """How many frames late a cut may be reported."""
        return int(self.detector.event_buffer_length)

    def push(self, index: int, frame_bgr: np.ndarray) -> list[int]:
        self.last = index
        found = self.detector.process_frame(FrameTimecode(index, self.fps), frame_bgr)
        return self._keep(found)

    def finish(self) -> list[int]:
        if self.last < 0:
            return []
        found = self.detector.post_process(FrameTimecode(self.last, self.fps)) or []
        return self._keep(found)

    def _keep(self, found) -> list[int]:
        return sorted({int(tc.frame_num) for tc in found} - {0})


DISSOLVE_SIZE = 16
BLENDED = (0.05, 0.95)  # a frame with a share of the second shot between these is part of a dissolve


def dissolve_frame(luma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A 16x16 float copy of a luma plane (the blur hides motion and coding noise, and not a blend),
    and the same less its mean (a change of brightness, exposure or a light, is no change of shot)."""
    small = cv2.resize(luma, (DISSOLVE_SIZE, DISSOLVE_SIZE), interpolation=cv2.INTER_AREA).astype(np.float32)
    return small, small - small.mean()


def _mean_abs_difference(a: np.ndarray, b: np.ndarray) -> float:
    return cv2.norm(a, b, cv2.NORM_L1) / a.size  # (a tenth of numpy's time on 256 values)


class DissolveDetector:
    """Cross-fades (dissolves) between two shots, which PySceneDetect's detectors do not see.

    Inside a dissolve every frame is a blend of the two shots, so a frame is the mean of the frames
    k before and k after it. Centres where that holds (a residual under `max_residual` of the
    change) while the frames k apart differ as two shots do (`min_change`) are candidates at each
    scale k; overlapping windows of candidates make one span. A span is a dissolve if its first and
    last frames are two shots: both textured (a fade from black is a blend too), unlike each other
    in their pattern of light (a change of exposure), and unlike nearly everywhere (`min_changed`: a
    title fading in over a shot changes a third of the picture). Its frames are those holding some
    of both shots (BLENDED). Camera motion breaks the blend, so a dissolve between two moving shots
    can be missed (bench/RESULTS.md).
    """

    def __init__(self, fps: float, scales=(2, 4, 8), min_change: float = 12.0, max_residual: float = 0.2,
                 max_similarity: float = 0.5, min_changed: float = 0.6, min_texture: float = 6.0,
                 max_seconds: float = 2.0):
        self.scales, self.kmax = scales, max(scales)
        self.min_change, self.max_residual = min_change, max_residual
        self.max_similarity, self.min_changed, self.min_texture = max_similarity, min_changed, min_texture
        # a longer span is a slow change; frames wait this long in cut_source's delay line, so the rate is
        # capped (a container stating 1000 fps would hold 2000 frames in memory)
        self.max_frames = math.ceil(max_seconds * min(fps, 120.0)) + 2 * self.kmax
        self.frames: deque[tuple[np.ndarray, np.ndarray]] = deque(maxlen=self.lag)  # back to a span's first
        self.index = -1
        self.span: list[int] | None = None  # [first, last] frame of the open run of candidates

    @property
    def lag(self) -> int:
        """How many frames late the first frame of a span may be reported."""
        return self.max_frames

    def frame(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.frames[i - self.index - 1]

    def push(self, index: int, frame: tuple[np.ndarray, np.ndarray]) -> list[tuple[int, int]]:
        """Give frames in order (dissolve_frame of each); get back spans (first, last) now complete."""
        self.index = index
        self.frames.append(frame)
        for k in self.scales:
            t = index - k
            if t - k >= 0 and self._blends(self.frame(t - k)[1], self.frame(t)[1], frame[1]):
                # windows that overlap, or come before the span can close, are one transition
                self.span = [t - k, index] if self.span is None else [min(self.span[0], t - k), index]
        if self.span is not None and index + 1 - self.span[0] >= self.max_frames:
            self.span = None  # a slow change (light, a slow pan), not a transition
        elif self.span is not None and index - 2 * self.kmax > self.span[1]:
            return self._close()  # no later window can reach the span
        return []

    def finish(self) -> list[tuple[int, int]]:
        return self._close() if self.span is not None else []

    def _blends(self, before: np.ndarray, middle: np.ndarray, after: np.ndarray) -> bool:
        change = _mean_abs_difference(after, before)
        return change >= self.min_change and _mean_abs_difference(
            middle, cv2.addWeighted(before, 0.5, after, 0.5, 0)) <= self.max_residual * change

    def _close(self) -> list[tuple[int, int]]:
        first, last = self.span
        self.span = None
        (a, ca), (b, cb) = self.frame(first), self.frame(last)
        textured = min(a.std(), b.std()) >= self.min_texture
        similarity = float((ca * cb).sum() / (np.linalg.norm(ca) * np.linalg.norm(cb) + 1e-6))
        changed = float((np.abs(a - b) > self.min_change).mean())
        if not (textured and similarity <= self.max_similarity and changed >= self.min_changed):
            return []
        # windows wider than the dissolve reach into the shots: keep the frames that blend in some of both
        direction = (cb - ca) / float((cb - ca).ravel() @ (cb - ca).ravel())
        share = [float((self.frame(i)[1] - ca).ravel() @ direction.ravel()) for i in range(first, last + 1)]
        blended = [first + i for i, s in enumerate(share) if BLENDED[0] < s < BLENDED[1]]
        return [(blended[0], blended[-1])] if blended else []
