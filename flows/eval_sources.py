"""What `mav evaluate` scores: a source string (a dataset NAME[@VERSION] under the data root, a folder
of videos, or an MLflow run's video artifacts, `runs:/<run_id>[/path]` or `mlflow:<run_id>`) -> the video
files, the prompts that made them where known (prompts.json / prompts.txt beside them) and how
they were sampled (samples.json)."""
from __future__ import annotations

import functools
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from eval.video_io import VIDEO_EXTENSIONS, list_videos

RUN_SOURCE = re.compile(r"^(?:runs:/|mlflow:)([0-9a-fA-F]{8,})(?:/(.*))?$")

@dataclass
class VideoSet:
    """Video files to score, the prompts that made them (if known) and where they came from."""
    source: str
    kind: str  # dataset | folder | mlflow-run | sampled
    paths: list[Path]
    prompts: list[str] | None = None
    version: str | None = None
    extra: dict = field(default_factory=dict)
    # why a prompts file beside the videos gave no prompts: said only where prompts are needed
    prompts_error: str | None = None

    def take(self, n: int | None, seed: int) -> "VideoSet":
        """A seeded random subset of n videos (all when n is None or larger)."""
        if n is None or n >= len(self.paths):
            return self
        idx = sorted(np.random.default_rng(seed).choice(len(self.paths), size=n, replace=False).tolist())
        prompts = [self.prompts[i] for i in idx] if self.prompts else None
        return VideoSet(self.source, self.kind, [self.paths[i] for i in idx], prompts, self.version, self.extra,
                        self.prompts_error)

    def require_prompts(self, why: str) -> None:
        if not self.prompts:
            found = self.prompts_error or f"none found with {self.source}"
            raise ValueError(f"{why} needs the prompts of the fake videos: pass --prompts FILE ({found})")


def _load_manifest(data_root: Path, name: str, version: str | None):
    from data_prep.dataset import load_manifest

    return load_manifest(data_root, name, version or "latest")


def _sidecar_prompts(folder: Path, paths: list[Path]) -> tuple[list[str] | None, str | None]:
    """(prompts, why not) from prompts.json / prompts.txt in `folder`, or else in the one folder
    that holds the videos (a run's samples/ artifacts). A file that does not fit the videos is no
    error here: FVD alone, or --prompts, does not need it."""
    parents = {p.parent for p in paths}
    for where in [folder] + (list(parents) if len(parents) == 1 else []):
        for name in ("prompts.json", "prompts.txt"):
            if (where / name).is_file():
                try:
                    return read_prompts(where / name, paths), None
                except ValueError as err:
                    return None, str(err)
    return None, None


def check_one_run(src: str, folder: Path, paths: list[Path]) -> dict | None:
    """`mav sample` into a folder that holds an earlier run's videos keeps them: refuse to score videos
    that samples.json (in `folder`, or else the one folder that holds them) says were sampled with
    other checkpoints or settings, or that it does not list beside ones it does, as one set.
    -> the settings that sampled them all, as samples.json records them (None: not recorded)."""
    parents = {p.parent for p in paths}
    found = [w / "samples.json" for w in [folder] + (list(parents) if len(parents) == 1 else [])
             if (w / "samples.json").is_file()]
    if not found:
        return None

    def unreadable(why):
        return ValueError(f"{src}: {found[0]} is not a samples record ({why}); remove it to score the videos "
                          "without it")
    try:
        records = json.loads(found[0].read_text())
    except ValueError as err:
        raise unreadable(err) from None
    if not (isinstance(records, dict) and all(isinstance(r, dict) for r in records.values())):
        raise unreadable("expected {video file name: {prompt, seed, ...}}")
    used = {p.name: records[p.name].get("sampled_with") for p in paths if p.name in records}
    unlisted = [p.name for p in paths if p.name not in used]
    if used and unlisted:
        raise ValueError(f"{src}: {unlisted[0]} is not in {found[0].name} beside videos that are: it is not "
                         "from the run that sampled them (a run stopped part way?); score one run's videos")
    first = {}  # each run's settings (as JSON) -> the first video sampled with them
    for name, settings in used.items():
        first.setdefault(json.dumps(settings, sort_keys=True), name)
    if len(first) > 1:
        names = list(first.values())[:2]
        a, b = ((used[name] or {}) for name in names)
        ckpts = a.get("checkpoints", {}), b.get("checkpoints", {})
        differ = [f"{stage} checkpoint" for stage in sorted({*ckpts[0], *ckpts[1]})
                  if ckpts[0].get(stage) != ckpts[1].get(stage)]
        differ += [key for key in sorted({*a, *b} - {"checkpoints"}) if a.get(key) != b.get(key)]
        raise ValueError(f"{src}: its videos come from {len(first)} sampling runs with different "
                         f"{', '.join(differ) or 'settings'} ({names[0]} and {names[1]}; see {found[0]}); score one "
                         "run's videos, e.g. sample into a new folder")
    settings = next(iter(used.values()), None)
    return settings if isinstance(settings, dict) else None


def _without_previews(paths: list[Path]) -> list[Path]:
    """Drop a GIF beside a video of the same name: `mav sample` writes both, and the GIF is a preview."""
    videos = {(p.parent, p.stem) for p in paths if p.suffix.lower() != ".gif"}
    return [p for p in paths if p.suffix.lower() != ".gif" or (p.parent, p.stem) not in videos]


def read_prompts(path: str | Path, videos: Sequence[Path] | None = None) -> list[str]:
    """Prompts from a .txt (one per line, in video order) or .json (a list in video order, or
    {video file name or stem: prompt}); with `videos`, returned in the videos' order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts {path}: no such file")
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text())
        else:
            data = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as err:  # both ValueErrors, neither names the file
        raise ValueError(f"prompts {path}: not readable ({err})") from None
    if not isinstance(data, (list, dict)):
        raise ValueError(f"prompts {path}: expected a list of prompts or {{video name: prompt}}")
    not_text = [k for k, v in (data.items() if isinstance(data, dict) else enumerate(data)) if not isinstance(v, str)]
    if not_text:
        raise ValueError(f"{path}: the prompt for {not_text[0]!r} is not text")
    if isinstance(data, dict):
        if videos is None:
            return list(data.values())
        missing = [str(v) for v in videos if v.name not in data and v.stem not in data]
        if missing:
            raise ValueError(f"{path}: no prompt for {', '.join(missing[:5])}")
        return [data.get(v.name, data.get(v.stem)) for v in videos]
    if videos is not None and len(data) != len(videos):
        raise ValueError(f"{path}: {len(data)} prompts for {len(videos)} videos")
    return list(data)


def not_in_store(src: str, tracking_uri: str, err: Exception) -> ValueError:
    reason = str(getattr(err, "message", err)).strip().splitlines()[0]
    return ValueError(f"{src}: not found in the MLflow store {tracking_uri} ({reason})")


@functools.cache
def _downloads() -> tempfile.TemporaryDirectory:
    """One temporary folder per process for MLflow runs' videos, removed when the process ends
    (a deployment runs each flow in its own process)."""
    return tempfile.TemporaryDirectory(prefix="mav-eval-")


def resolve_source(src: str, data_root: str | Path = "mav-data", tracking_uri: str | None = None) -> VideoSet:
    """A SRC string -> the video files it names."""
    m = RUN_SOURCE.match(src)
    if m:
        import mlflow
        from mlflow.exceptions import MlflowException

        run_id, sub = m.group(1), m.group(2) or ""
        dst = Path(tempfile.mkdtemp(prefix=f"run-{run_id[:8]}-", dir=_downloads().name))
        try:
            local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=sub or None,
                                                             dst_path=str(dst), tracking_uri=tracking_uri))
        except (MlflowException, OSError) as err:
            raise not_in_store(src, tracking_uri or mlflow.get_tracking_uri(), err) from None
        # sample videos, not the evaluation's own grid pictures
        paths = _without_previews([p for p in list_videos(local) if "grid" not in p.stem])
        if not paths:
            raise ValueError(f"{src}: the run has no video artifacts ({', '.join(VIDEO_EXTENSIONS)})")
        sampled_with = check_one_run(src, local, paths)
        prompts, why_not = _sidecar_prompts(local, paths)
        return VideoSet(src, "mlflow-run", paths, prompts, extra={"run_id": run_id, "sampled_with": sampled_with},
                        prompts_error=why_not)
    folder = Path(src).expanduser()
    if folder.is_dir():
        paths = _without_previews(list_videos(folder))
        if not paths:
            raise ValueError(f"{src}: folder holds no videos ({', '.join(VIDEO_EXTENSIONS)})")
        sampled_with = check_one_run(src, folder, paths)
        prompts, why_not = _sidecar_prompts(folder, paths)
        return VideoSet(src, "folder", paths, prompts, extra={"sampled_with": sampled_with}, prompts_error=why_not)
    name, _, version = src.partition("@")
    root = Path(data_root)
    if not (root / "datasets" / name).is_dir():
        raise ValueError(f"{src}: not a folder, an MLflow run (runs:/<id>, mlflow:<id>) or a dataset under {root}/datasets")
    manifest = _load_manifest(root, name, version or None)
    if manifest.empty:
        raise ValueError(f"{src}: the dataset version has no clips")
    captions = manifest["caption"].fillna("").tolist() if "caption" in manifest else []
    prompts = captions if captions and all(captions) else None
    return VideoSet(src, "dataset", [Path(p) for p in manifest["clip_abspath"]], prompts,
                    version=manifest.attrs.get("version"))
