"""Evaluation protocols on local copies of the benchmark data sets (nothing is downloaded).

UCF-101 (class-conditional FVD and IS). Expected layout, as distributed:
    ROOT/UCF-101/<ClassName>/v_<ClassName>_gXX_cYY.avi
    ROOT/ucfTrainTestlist/{classInd.txt, trainlist0N.txt, testlist0N.txt}
Prompts are class templates, "a person <class name split on camel case>"
("ApplyEyeMakeup" -> "a person apply eye makeup"); fake videos are drawn with the
class frequencies of the real split. Clips: 16 frames (FVD and IS); FVD as in
docs/metrics.md (StyleGAN-V: 2048 real + 2048 fake, biased covariance, one random
offset per real video); IS: C3D, 16 frames at 112x112, 2048 samples x 10 splits
(TGANv2; eval.inception_score takes its classifier as StyleGAN-V distributes it).

MSR-VTT (text-to-video CLIPSIM). The test captions JSON (`test_videodatainfo.json`:
{"sentences": [{"video_id", "caption"}, ...]}); Make-A-Video scores one video per
caption with ViT-B/32 CLIPSIM (0.3049 reported). `captions(..., per_video="all")` keeps
every caption, "first" keeps one per video. Test videos, for FVD: VIDEO_ROOT/<video_id>.mp4
(any extension of eval.video_io, in subfolders too).

`load_protocol` turns either benchmark into a `Protocol`: the prompts to sample, the
prompts a fake video may carry, the real videos and the metrics (flows.evaluate runs it).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eval.video_io import list_videos

PROTOCOLS = ("ucf101", "msrvtt")


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
    """`split_file` (a name in ucfTrainTestlist/ or a path) replaces `{split}list0{fold}.txt`."""

    def __init__(self, root: str | Path, split: str = "train", fold: int = 1, split_file: str | Path | None = None):
        self.root = Path(root)
        self.split, self.fold = split, fold
        lists = self.root / "ucfTrainTestlist"
        videos = self.root / "UCF-101"
        if not videos.is_dir() or not lists.is_dir():
            raise FileNotFoundError(f"{self.root}: expected UCF-101/ and ucfTrainTestlist/ (the official archives unpacked)")
        self.split_file = lists / (split_file or f"{split}list0{fold}.txt")
        if not self.split_file.is_file():
            raise FileNotFoundError(f"{self.split_file}: no such split file (trainlist0N.txt / testlist0N.txt)")
        self.classes = [line.split()[1] for line in (lists / "classInd.txt").read_text().split("\n") if line.strip()]
        names = self.split_file.read_text().split()
        rel = [n for n in names if n.endswith(".avi")]  # trainlist lines carry a label after the path
        if not rel:
            raise ValueError(f"{self.split_file}: lists no .avi videos")
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
    try:
        data = json.loads(Path(json_path).read_text())
    except (OSError, ValueError) as err:  # neither names the file
        raise ValueError(f"captions {json_path}: not readable JSON ({err})") from None
    sentences = data.get("sentences") if isinstance(data, dict) else data
    if not isinstance(sentences, list):
        raise ValueError(f"{json_path}: no 'sentences' list (expected MSR-VTT's test_videodatainfo.json)")
    broken = [i for i, s in enumerate(sentences) if not (isinstance(s, dict) and isinstance(s.get("video_id"), str)
                                                          and isinstance(s.get("caption"), str))]
    if broken:
        raise ValueError(f"{json_path}: sentence {broken[0]} (of {len(broken)}) lacks a 'video_id' or 'caption' text")
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


def msrvtt_videos(video_root: str | Path, video_ids) -> list[Path]:
    """The files of `video_ids` under video_root (<video_id>.<ext>); all must be there."""
    root = Path(video_root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder of MSR-VTT videos")
    found = {p.stem: p for p in list_videos(root)}
    missing = sorted(set(video_ids) - set(found))
    if missing:
        raise FileNotFoundError(f"{root}: {len(missing)} test videos are missing, e.g. {', '.join(missing[:3])}")
    return [found[v] for v in sorted(set(video_ids))]


# the paper scores both benchmarks on 16x256x256 videos: the decoder's 16 frames super-resolved to
# 256 px, without frame interpolation (76 frames) or the 768 px stage. The stages sampled for them.
PAPER_CHAIN = ("prior", "decoder", "sr_low")


@dataclass
class Protocol:
    """One benchmark's inputs: the prompts to sample fake videos for, the prompts a fake video
    may carry (sidecar prompts of videos made elsewhere are checked against them), the real
    videos for FVD ([] = none), the metrics, the default number of videos and what to log."""
    name: str
    metrics: tuple[str, ...]
    prompts: list[str]
    allowed: frozenset[str]
    real: list[Path]
    real_source: str | None
    num_videos: int | None
    params: dict = field(default_factory=dict)

    def check_prompts(self, prompts: list[str], source: str) -> None:
        bad = [p for p in prompts if p not in self.allowed]
        if bad:
            kind = "UCF-101 class templates" if self.name == "ucf101" else "MSR-VTT test captions"
            raise ValueError(f"{source}: {len(bad)} prompts are not {kind}, e.g. {bad[0]!r}")


def protocol_metrics(name: str, video_root=None) -> tuple[str, ...]:
    """What a protocol scores: UCF-101 FVD and IS; MSR-VTT CLIPSIM, and FVD given its videos."""
    return ("fvd", "is") if name == "ucf101" else ("clipsim", "fvd") if video_root else ("clipsim",)


def ucf101_protocol(root, split_file=None, num_videos: int | None = None, seed: int = 0) -> Protocol:
    """Class-template prompts with the split's class frequencies; FVD and IS as UCF101Settings."""
    ds, settings = UCF101(root, split_file=split_file), UCF101Settings()
    missing = [v for v in ds.videos if not v.is_file()]
    if missing:
        raise FileNotFoundError(f"{ds.split_file}: {len(missing)} listed videos are missing, e.g. {missing[0]}")
    n = num_videos or settings.fvd_num_videos
    return Protocol("ucf101", protocol_metrics("ucf101"), ds.class_prompts(n, seed), frozenset(ds.prompts()), ds.videos,
                    str(ds.split_file), n, {"split_file": str(ds.split_file), "num_classes": len(set(ds.labels))})


def msrvtt_protocol(captions, video_root=None, num_videos: int | None = None, seed: int = 0) -> Protocol:
    """One video per test caption (a seeded choice of num_videos of them); CLIPSIM, and FVD
    against the test videos when video_root is given."""
    pairs = msrvtt_captions(captions)
    if num_videos and num_videos < len(pairs):
        keep = np.random.default_rng(seed).choice(len(pairs), num_videos, replace=False)
        pairs_used = [pairs[i] for i in sorted(keep)]
    else:
        pairs_used = pairs
    real = msrvtt_videos(video_root, {vid for vid, _ in pairs}) if video_root else []
    return Protocol("msrvtt", protocol_metrics("msrvtt", real), [cap for _, cap in pairs_used],
                    frozenset(cap for _, cap in pairs), real, str(video_root) if real else None, num_videos,
                    {"captions_file": str(captions), "num_captions": len(pairs)})


def check_protocol_inputs(name: str, root=None, captions=None) -> None:
    """The inputs a protocol cannot start without (checked again by load_protocol)."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; choose from {', '.join(PROTOCOLS)}")
    if name == "ucf101" and not root:
        raise ValueError("the ucf101 protocol needs its root (--protocol-root: UCF-101/ and ucfTrainTestlist/)")
    if name == "msrvtt" and not captions:
        raise ValueError("the msrvtt protocol needs its captions (--captions test_videodatainfo.json)")


def load_protocol(name: str, *, root=None, split_file=None, captions=None, video_root=None,
                  num_videos: int | None = None, seed: int = 0) -> Protocol:
    check_protocol_inputs(name, root, captions)
    if name == "ucf101":
        return ucf101_protocol(root, split_file, num_videos, seed)
    return msrvtt_protocol(captions, video_root, num_videos, seed)
