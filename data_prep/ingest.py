"""One source, start to finish: fetch -> probe -> scenes + clips -> record. No orchestration here.

Every failure becomes a SourceOutcome with the stage and a reason a person can act on;
nothing raised here stops the other sources.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from data_prep.clips import DecodeError, cut_source
from data_prep.config import IngestConfig
from data_prep.dataset import LockBusy, read_source_record, source_lock, write_source_record
from data_prep.download import DownloadError, PageURLError, download, download_page, sha256_file
from data_prep.probe import ProbeError, probe
from data_prep.sources import SourceRef, without_password


@dataclass
class SourceOutcome:
    source: str
    status: str  # "new", "unchanged", "failed" or "duplicate" (the same bytes as another source: `reason`);
    # "busy" (not waited for: another worker is cutting the same bytes, `fetched` holds them) until done
    source_sha256: str = ""
    stage: str = ""  # where it failed
    reason: str = ""
    clips: list[dict] = field(default_factory=list)  # manifest rows
    cuts: list[int] = field(default_factory=list)
    probe: dict = field(default_factory=dict)
    rejected: bool = False  # failed for good under these settings (recorded): its earlier clips leave
    fetched: Path | None = None  # where a busy source's bytes are, for process_source to take up again

    def failure_row(self) -> dict:
        return {"source": self.source, "stage": self.stage, "reason": self.reason}


def fetch(ref: SourceRef, data_root: Path, cfg: IngestConfig) -> tuple[Path, str]:
    if ref.kind == "unsupported":
        raise DownloadError(f"unsupported source scheme in {ref.name!r} (only http, https and file)")
    if ref.kind == "unreadable":
        raise DownloadError(ref.reason)
    if ref.kind == "empty":
        raise DownloadError("folder holds no video files (by extension: the ingest config's video_extensions)"
                            if Path(ref.source).is_dir() else "URL list has no entries")
    if ref.kind == "url":
        raw_dir = Path(data_root) / "raw"
        try:
            return download(ref.source, raw_dir, cfg.download)
        except PageURLError:
            return download_page(ref.source, raw_dir)
    path = Path(ref.source)
    if not path.exists():
        raise DownloadError("no such file")
    if not path.is_file():
        raise DownloadError("not a regular file")
    return path, sha256_file(path)


# Raised when a probe rejection may no longer hold for the same bytes (2: raw H.264/HEVC streams,
# whose packets carry no timestamps, probe now): older probe rejections are probed again
REJECTION_RULES = 2


def process_source(ref: SourceRef, data_root: Path, ds_dir: Path, cfg: IngestConfig,
                   on_frames: Callable[[int], None] | None = None, wait: bool = True,
                   fetched: tuple[Path, str] | None = None) -> SourceOutcome:
    """`wait`: for another worker cutting the same bytes, else the outcome is "busy" at once (a
    worker slot is not held waiting); `fetched`: a busy outcome's bytes (path, sha256), taken up."""
    settings = cfg.clip_settings_hash()
    try:
        path, digest = fetched or fetch(ref, data_root, cfg)
    except Exception as err:  # DownloadError, OSError, or what nobody foresaw: tried again next time
        return SourceOutcome(ref.name, "failed", stage="download", reason=_reason(err))
    try:  # the same bytes at another path or URL of this run wait here, then find this one's record
        with source_lock(ds_dir, digest, settings, wait):
            return _process_bytes(ref, path, digest, settings, ds_dir, cfg, on_frames)
    except LockBusy:
        return SourceOutcome(ref.name, "busy", digest, fetched=path)
    except OSError as err:  # the lock file cannot be made (a read-only or full disk): tried again
        return SourceOutcome(ref.name, "failed", digest, stage="record", reason=_reason(err))


def _process_bytes(ref: SourceRef, path: Path, digest: str, settings: str, ds_dir: Path, cfg: IngestConfig,
                   on_frames: Callable[[int], None] | None) -> SourceOutcome:
    """Probe, cut and record fetched bytes (`settings`: the clip settings hash), unless a record says
    they were done (or rejected)."""
    try:
        done = read_source_record(ds_dir, digest, settings)
    except (OSError, ValueError) as err:
        return SourceOutcome(ref.name, "failed", digest, stage="record", reason=_reason(err))
    if done is not None and done.get("rejected", {}).get("stage") == "probe" and done.get("rules", 1) < REJECTION_RULES:
        done = None  # probed again: the rules changed since
    if done is not None and "rejected" in done:  # these bytes failed before, for a reason they alone decide
        return SourceOutcome(ref.name, "failed", digest, cuts=done["cuts"], rejected=True, **done["rejected"])
    if done is not None and not all((ds_dir / clip["clip_path"]).is_file() for clip in done["clips"]):
        done = None  # a clip file went (deleted by hand, a partial restore): cut again, to the same clip ids
    if done is not None:  # processed before with the same settings: nothing to redo
        return SourceOutcome(ref.name, "unchanged", digest, clips=_rows(done["clips"], ref.name, digest),
                             cuts=done["cuts"], probe=done["probe"])
    try:
        info = probe(path)
    except ProbeError as err:
        return _rejected(ds_dir, settings, ref.name, digest, "probe", _reason(err))
    except Exception as err:  # unreadable now (permissions, a flaky disk, a codec this build lacks): tried again
        return SourceOutcome(ref.name, "failed", digest, stage="probe", reason=_reason(err))
    if info.duration_s < cfg.scenes.min_scene_s:
        reason = f"video is {info.duration_s:.2f} s long, shorter than the minimum scene ({cfg.scenes.min_scene_s:g} s)"
        return _rejected(ds_dir, settings, ref.name, digest, "probe", reason)
    try:
        result = cut_source(path, info, digest, ds_dir / "clips", cfg, on_frames=on_frames)
    except Exception as err:  # may be the machine's (memory, disk): tried again next time
        return SourceOutcome(ref.name, "failed", digest, stage="decode", reason=_reason(err))
    if not result.clips:
        reason = (f"no scene reached the minimum length of {cfg.scenes.min_scene_s:g} s "
                  f"({len(result.cuts)} cuts in {info.duration_s:.1f} s)")
        return _rejected(ds_dir, settings, ref.name, digest, "scenes", reason, result.cuts)
    record = {"source_sha256": digest, "source": ref.name, "probe": info.summary(), "cuts": result.cuts,
              "frames_decoded": result.frames_decoded, "clips": result.clips}
    try:
        write_source_record(ds_dir, record, settings)  # written last: the source counts as done only now
    except OSError as err:  # the clips stay on disk, unlisted; the next run cuts the source again
        return SourceOutcome(ref.name, "failed", digest, stage="record", reason=_reason(err))
    return SourceOutcome(ref.name, "new", digest, clips=_rows(result.clips, ref.name, digest),
                         cuts=result.cuts, probe=info.summary())


def merge_same_bytes(outcomes: list[SourceOutcome]) -> list[SourceOutcome]:
    """Sources holding the same bytes (two paths, a path and a URL) are one source: the first of
    them by name takes the best outcome of the lot (their clips, once; "new" if any cut them) and
    the others are "duplicate", naming it. Which of them cut the bytes and which found the record
    depends on timing; naming the first by name (not by the order given) makes the report and the
    manifest depend on neither."""
    groups: dict[str, list[SourceOutcome]] = {}
    for outcome in outcomes:
        if outcome.source_sha256:  # a failed download has no bytes to compare
            groups.setdefault(outcome.source_sha256, []).append(outcome)
    firsts = {digest: min(group, key=lambda o: o.source) for digest, group in groups.items() if len(group) > 1}
    merged = []
    for outcome in outcomes:
        first = firsts.get(outcome.source_sha256)
        if first is None:
            merged.append(outcome)
        elif outcome is not first:
            merged.append(SourceOutcome(outcome.source, "duplicate", outcome.source_sha256,
                                        reason=f"same bytes as {first.source}"))
        else:
            merged.append(_best_of(groups[outcome.source_sha256], first.source))
    return merged


def _best_of(group: list[SourceOutcome], source: str) -> SourceOutcome:
    """The outcome of one set of bytes given as several sources, under the name `source`."""
    done = [o for o in group if o.status != "failed"]
    if not done:  # failed under every name: the first's reason speaks for all
        first = next(o for o in group if o.source == source)
        return replace(first, rejected=any(o.rejected for o in group))
    best = next((o for o in done if o.status == "new"), done[0])
    return replace(best, source=source, clips=[{**row, "source": source} for row in best.clips])


def _rejected(ds_dir: Path, settings: str, source: str, digest: str, stage: str, reason: str,
              cuts: list[int] = ()) -> SourceOutcome:
    """A failure that the bytes and the clip settings alone decide: recorded, so later ingests
    report it without probing or decoding the same bytes again."""
    try:
        write_source_record(ds_dir, {"source_sha256": digest, "source": source, "cuts": list(cuts),
                                     "rejected": {"stage": stage, "reason": reason}, "rules": REJECTION_RULES},
                            settings)
    except OSError:  # not recorded (a full disk): reported all the same, and decided again next run
        return SourceOutcome(source, "failed", digest, stage=stage, reason=reason, cuts=list(cuts))
    return SourceOutcome(source, "failed", digest, stage=stage, reason=reason, cuts=list(cuts), rejected=True)


def _rows(clips: list[dict], source: str, digest: str) -> list[dict]:
    return [{**clip, "source": source, "source_sha256": digest, "caption": ""} for clip in clips]


def _reason(err: Exception) -> str:
    text = without_password(str(getattr(err, "reason", None) or err) or err.__class__.__name__)  # (URLs in it)
    if isinstance(err, (OSError, DownloadError, DecodeError, ProbeError)):
        return text
    return f"unexpected {err.__class__.__name__}: {text}"  # a bug of ours, said as one
