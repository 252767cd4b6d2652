"""Scene cut detection with PySceneDetect, fed frame by frame from our own decode pass."""
from __future__ import annotations

from fractions import Fraction

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
