"""Evaluation protocols on local copies of the benchmark data sets (nothing is downloaded).

UCF-101 (class-conditional FVD and IS). Expected layout, as distributed:
    ROOT/UCF-101/<ClassName>/v_<ClassName>_gXX_cYY.avi
    ROOT/ucfTrainTestlist/{classInd.txt, trainlist0N.txt, testlist0N.txt}
Prompts are class templates, "a person <class name split on camel case>"
("ApplyEyeMakeup" -> "a person apply eye makeup"); fake videos are drawn with the
class frequencies of the real split. Clips: 16 frames (FVD and IS); FVD as in
docs/metrics.md (StyleGAN-V: 2048 real + 2048 fake, biased covariance, one random
offset per real video); IS: C3D, 16 frames at 112x112, 2048 samples x 10 splits
(TGANv2) - see eval.inception_score for what is not validated yet.

MSR-VTT (text-to-video CLIPSIM). The test captions JSON (`test_videodatainfo.json`:
{"sentences": [{"video_id", "caption"}, ...]}); Make-A-Video scores one video per
caption with ViT-B/32 CLIPSIM (0.3049 reported). `captions(..., per_video="all")` keeps
every caption, "first" keeps one per video.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def camel_words(name: str) -> list[str]:
    """'ApplyEyeMakeup' -> ['apply', 'eye', 'makeup']; 'YoYo' -> ['yo', 'yo']; keeps digits apart."""
    return [w.lower() for w in re.findall(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+", name)]


def ucf_prompt(class_name: str) -> str:
    return "a person " + " ".join(camel_words(class_name))


@dataclass(frozen=True)
class UCF101Settings:
    num_frames: int = 16
    fvd_num_videos: int = 2048  # StyleGAN-V "fvd2048_16f"
    fvd_unbiased: bool = False
    is_num_videos: int = 2048  # TGANv2: 2048 samples x 10 splits
    is_splits: int = 10
    is_frame_size: int = 112


class UCF101:
    def __init__(self, root: str | Path, split: str = "train", fold: int = 1):
        self.root = Path(root)
        self.split, self.fold = split, fold
        lists = self.root / "ucfTrainTestlist"
        videos = self.root / "UCF-101"
        if not videos.is_dir() or not lists.is_dir():
            raise FileNotFoundError(f"{self.root}: expected UCF-101/ and ucfTrainTestlist/ (the official archives unpacked)")
        self.classes = [line.split()[1] for line in (lists / "classInd.txt").read_text().split("\n") if line.strip()]
        names = (lists / f"{split}list0{fold}.txt").read_text().split()
        rel = [n for n in names if n.endswith(".avi")]  # trainlist lines carry a label after the path
        self.videos = [videos / r for r in rel]
        self.labels = [r.split("/")[0] for r in rel]

    def prompts(self) -> list[str]:
        return [ucf_prompt(c) for c in self.labels]

    def class_prompts(self, n: int, seed: int = 0) -> list[str]:
        """n prompts drawn with this split's class frequencies (for sampling fake videos)."""
        counts = Counter(self.labels)
        classes = sorted(counts)
        p = np.array([counts[c] for c in classes], dtype=np.float64)
        draw = np.random.default_rng(seed).choice(len(classes), size=n, p=p / p.sum())
        return [ucf_prompt(classes[i]) for i in draw]


def msrvtt_captions(json_path: str | Path, per_video: str = "all") -> list[tuple[str, str]]:
    """[(video_id, caption)] from MSR-VTT's test_videodatainfo.json."""
    data = json.loads(Path(json_path).read_text())
    sentences = data["sentences"] if isinstance(data, dict) else data
    pairs = [(s["video_id"], s["caption"].strip()) for s in sentences]
    if per_video == "first":
        seen: dict[str, str] = {}
        for vid, cap in pairs:
            seen.setdefault(vid, cap)
        pairs = sorted(seen.items())
    elif per_video != "all":
        raise ValueError(f"per_video must be 'all' or 'first', got {per_video!r}")
    if not pairs:
        raise ValueError(f"{json_path}: no captions")
    return pairs
