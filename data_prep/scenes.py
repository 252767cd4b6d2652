"""Scene cut detection with PySceneDetect, fed frame by frame from our own decode pass."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
from scenedetect import AdaptiveDetector, ContentDetector, FrameTimecode, HashDetector, HistogramDetector

from data_prep.config import SceneConfig


def make_detector(cfg: SceneConfig, fps: float):
    # The detector's min_scene_len (its default, 15 frames) merges the flicker of fades into
    # one cut; clip lengths are then set by our own filter (min/max scene, trim).
    if cfg.detector == "content":
        kwargs = {"threshold": cfg.threshold} if cfg.threshold is not None else {}
        return ContentDetector(min_scene_len=cfg.detector_min_frames, **kwargs)
    if cfg.detector == "adaptive":
        kwargs = {"adaptive_threshold": cfg.threshold} if cfg.threshold is not None else {}
        return AdaptiveDetector(min_scene_len=cfg.detector_min_frames, **kwargs)
    if cfg.detector == "histogram":
        kwargs = {"threshold": cfg.threshold} if cfg.threshold is not None else {}
        return HistogramDetector(min_scene_len=cfg.detector_min_frames, **kwargs)
    kwargs = {"threshold": cfg.threshold} if cfg.threshold is not None else {}
    return HashDetector(min_scene_len=cfg.detector_min_frames, **kwargs)


class CutDetector:
    """Push frames in decode order; get back the frame numbers where new shots start."""

    def __init__(self, cfg: SceneConfig, fps: float):
        self.detector = make_detector(cfg, fps)
        self.fps = Fraction(fps).limit_denominator(100000) if fps > 0 else Fraction(25)
        self.last = -1

    @property
    def lag(self) -> int:
        """How many frames late a cut may be reported."""
        return int(getattr(self.detector, "event_buffer_length", 0) or 0)

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
        return sorted({int(tc.frame_num if hasattr(tc, "frame_num") else tc) for tc in found} - {0})
