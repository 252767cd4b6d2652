"""Typed ingest settings, loaded from YAML (configs/*/ingest.yaml)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class DownloadConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # bounds: requests refuses a timeout of 0, and below 0 retries no try is made at all
    connect_timeout_s: float = Field(10.0, gt=0)
    read_timeout_s: float = Field(30.0, gt=0)  # a server silent this long counts as stalled
    retries: int = Field(3, ge=0)
    backoff_s: float = Field(0.5, ge=0)  # doubles after each failed try
    max_bytes: int = Field(2 * 1024**3, gt=0)
    max_redirects: int = Field(5, ge=0)


class SceneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # ContentDetector found exactly the labelled cuts on bikes.mp4 and big_buck_bunny_0_30;
    # AdaptiveDetector added false cuts in the fade-in (bench/ingest.py prints both).
    detector: Literal["content", "adaptive", "histogram", "hash"] = "content"
    threshold: float | None = None  # None: the detector's own default
    detect_width: int = Field(256, ge=2)  # PySceneDetect's own auto-downscale target
    # The detector's own minimum shot length, in frames. Above 0, PySceneDetect merges or suppresses a
    # cut that comes sooner than this after the last one, and a clip then holds several shots (15 joined
    # shots of 8, 60 and 12 frames into one clip). 0 reports every cut; min_scene_s then drops the pieces
    # too short to be clips (short shots, the flicker of a fade).
    detector_min_frames: int = Field(0, ge=0)
    min_scene_s: float = 1.0
    max_scene_s: float = 10.0  # longer scenes are split into pieces of this length
    trim_frames: int = Field(0, ge=0)  # frames dropped on each side of a cut
    # Cross-fades between two shots (no detector above sees them): their frames are dropped, and the
    # shots on either side are clips of their own (data_prep.scenes.DissolveDetector).
    dissolves: bool = True


class ClipConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    short_side: int = Field(256, ge=2)  # below 2, every clip came out 2x2 pixels
    crop: Literal["center_square", "none"] = "center_square"
    fps: float | None = Field(None, gt=0)  # None keeps the source's frame rate
    # ultrafast at crf 25 matches veryfast at crf 22 in PSNR on our corpus with 2.3x less encode CPU
    # and 2x faster decoding in training, for 1.7-2.7x the bytes (bench/RESULTS.md); for smaller
    # files at the same quality use preset: veryfast, crf: 22
    crf: int = 25
    preset: str = "ultrafast"
    # frames from one keyframe to the next: training decodes a window from the keyframe before it, where
    # x264's own 250 meant decoding from the clip's start. On the corpus, 32 (with one decoder thread)
    # took 3.3-3.6x less decoding CPU for an image-mode sample, 1.5x for a 16-frame window, for 8 % more
    # bytes (26 % on a still scene; bench/loader.py, bench/RESULTS.md)
    keyframe_every: int = Field(32, ge=1)


# containers ingest reads (folders are scanned for these) and evaluation accepts
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".flv")


class IngestConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    scenes: SceneConfig = Field(default_factory=SceneConfig)
    clips: ClipConfig = Field(default_factory=ClipConfig)
    video_extensions: list[str] = list(VIDEO_EXTENSIONS)
    shard_max_clips: int = Field(256, ge=1)  # 0 failed the commit, after every source was cut
    workers: int = Field(2, ge=1)  # sources processed at once

    def clip_settings_hash(self) -> str:
        """What a clip's bytes depend on; part of every clip id. A setting added later is left out
        at the value that cuts as before it existed (SETTINGS_ADDED_LATER), so a dataset cut before
        keeps its clips under it: with the new default it is cut again."""
        settings = {"scenes": self.scenes.model_dump(), "clips": self.clips.model_dump()}
        for (group, name), before in SETTINGS_ADDED_LATER.items():
            if settings[group][name] == before:
                del settings[group][name]
        payload = json.dumps(settings, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# (group, name) -> the value that cuts as before the setting existed
SETTINGS_ADDED_LATER = {("scenes", "dissolves"): False,
                        ("clips", "keyframe_every"): 250}  # x264's default: the same bytes as no -g


class ConfigError(ValueError):
    pass


def load_ingest_config(path: str | Path | None) -> IngestConfig:
    if path is None:
        return IngestConfig()
    path = Path(path)
    raw = read_yaml_mapping(path, "ingest config")
    raw = raw.get("ingest", raw)  # allow a top-level `ingest:` section
    try:
        return IngestConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"ingest config {path}: {describe(err)}") from None


def read_yaml_mapping(path: Path, what: str) -> dict:
    """A YAML file of settings; a missing file, bad YAML or a top level that is not a mapping is a
    ConfigError in one line naming `what` and the file."""
    if not path.is_file():
        raise ConfigError(f"{what} {path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {path}: {describe_yaml(err)}") from None
    except UnicodeDecodeError as err:  # its own message named no file
        raise ConfigError(f"{what} {path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} {path}: expected a mapping of settings, got {type(raw).__name__}")
    return raw


def describe_yaml(err: yaml.YAMLError) -> str:
    """A YAML syntax error in one line: what and where (line:column, 1-based)."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"not valid YAML: {getattr(err, 'problem', None) or err}{where}"


def describe(err: ValidationError) -> str:
    """A pydantic error in one line: `dotted.key: message` per problem (shared by every config loader)."""
    problems = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        problems.append(f"{key}: {'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}")
    return "; ".join(problems)
