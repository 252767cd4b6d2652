from pathlib import Path

import pandas as pd
import pytest

from data_prep.config import ConfigError, load_ingest_config
from data_prep.sources import expand_sources

EXT = [".mp4", ".mkv"]


def test_folders_expand_recursively_by_extension(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/one.mp4", "a/b/two.MKV", "a/notes.txt", "a/b/three.jpg"):
        (tmp_path / name).write_bytes(b"x")
    refs = expand_sources([str(tmp_path / "a")], EXT)
    assert [Path(r.source).name for r in refs] == ["two.MKV", "one.mp4"]
    assert all(r.kind == "file" and Path(r.source).is_absolute() for r in refs)


def test_url_lists_txt_csv_parquet(tmp_path):
    (tmp_path / "list.txt").write_text("# comment\nhttp://h/a.mp4\n\nhttps://h/b.mp4\nlocal.mp4\n")
    (tmp_path / "list.csv").write_text("caption,url\nx,http://h/c.mp4\ny,http://h/a.mp4\n")
    pd.DataFrame({"url": ["http://h/d.mp4"]}).to_parquet(tmp_path / "list.parquet")
    refs = expand_sources([str(tmp_path / n) for n in ("list.txt", "list.csv", "list.parquet")], EXT)
    sources = [r.source for r in refs]
    # repeats dropped, order kept, relative entries resolved against the list's folder
    assert sources == ["http://h/a.mp4", "https://h/b.mp4", str(tmp_path / "local.mp4"), "http://h/c.mp4", "http://h/d.mp4"]
    assert [r.kind for r in refs] == ["url", "url", "file", "url", "url"]


def test_url_lists_saved_with_a_byte_order_mark(tmp_path):
    (tmp_path / "list.txt").write_text("http://h/a.mp4\nhttp://h/b.mp4\n", encoding="utf-8-sig")
    (tmp_path / "list.csv").write_text("url,caption\nhttp://h/c.mp4,x\n", encoding="utf-8-sig")
    refs = expand_sources([str(tmp_path / "list.txt"), str(tmp_path / "list.csv")], EXT)
    assert [(r.source, r.kind) for r in refs] == [("http://h/a.mp4", "url"), ("http://h/b.mp4", "url"),
                                                 ("http://h/c.mp4", "url")]


def test_a_folder_or_list_naming_no_videos_is_a_failed_source(tmp_path):
    from data_prep.ingest import process_source

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no videos here")
    (tmp_path / "list.txt").write_text("# nothing yet\n")
    refs = expand_sources([str(tmp_path / "empty"), str(tmp_path / "list.txt")], EXT)
    assert [r.kind for r in refs] == ["empty", "empty"]
    cfg = load_ingest_config(None)
    outcomes = [process_source(ref, tmp_path / "root", tmp_path / "root" / "datasets" / "d", cfg) for ref in refs]
    assert [(o.status, o.reason) for o in outcomes] == [
        ("failed", "folder holds no video files (by extension: the ingest config's video_extensions)"),
        ("failed", "URL list has no entries")]


def test_unreadable_url_lists_are_failed_sources_and_the_rest_go_on(tmp_path):
    from data_prep.ingest import process_source

    pd.DataFrame({"x": [1]}).to_parquet(tmp_path / "bad.parquet")
    (tmp_path / "latin1.txt").write_bytes("http://example.org/caf\xe9.mp4\n".encode("latin-1"))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    (tmp_path / "good.txt").write_text("http://example.org/a.mp4\nhttp://[::1/b.mp4\n")
    refs = expand_sources([str(tmp_path / n) for n in ("bad.parquet", "latin1.txt", "broken.parquet", "good.txt")], EXT)
    assert [r.kind for r in refs] == ["unreadable", "unreadable", "unreadable", "url", "unreadable"]
    assert refs[-1].source == "http://[::1/b.mp4" and refs[-1].reason == "not a valid URL (Invalid IPv6 URL)"
    cfg = load_ingest_config(None)
    outcomes = [process_source(ref, tmp_path / "root", tmp_path / "root" / "datasets" / "d", cfg) for ref in refs[:3]]
    assert all(o.status == "failed" and o.stage == "download" for o in outcomes)
    assert [o.source for o in outcomes] == [str(tmp_path / n) for n in ("bad.parquet", "latin1.txt", "broken.parquet")]
    assert "URL list cannot be read: no url column (looked for url" in outcomes[0].reason
    assert "utf-8" in outcomes[1].reason


def test_other_schemes_are_marked_unsupported():
    (ref,) = expand_sources(["ftp://example/x.mp4"], EXT)
    assert ref.kind == "unsupported"


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "ingest.yaml"
    bad.write_text("scenes:\n  detector: magic\nclips:\n  short_sid: 3\n")
    with pytest.raises(ConfigError) as err:
        load_ingest_config(bad)
    assert "scenes.detector" in str(err.value) and "clips.short_sid" in str(err.value)


def test_file_urls_are_percent_decoded(tmp_path):
    (ref,) = expand_sources([f"file://{tmp_path}/my%20clip%231.mp4"], EXT)
    assert ref.kind == "file" and ref.source == str(tmp_path / "my clip#1.mp4")


def test_evaluation_accepts_every_container_ingest_reads():
    from data_prep.config import IngestConfig
    from eval.video_io import VIDEO_EXTENSIONS

    assert set(IngestConfig().video_extensions) <= set(VIDEO_EXTENSIONS)


def test_a_video_whose_scenes_are_all_too_short_is_a_failed_source(tmp_path):
    """Hard cuts every 0.6 s (colour changes) and min_scene_s 1: the scenes stage rejects it, and
    the rejection is recorded with the cuts it found."""
    import json
    import subprocess

    from data_prep.ffmpeg_bin import ffmpeg_exe
    from data_prep.ingest import process_source
    from data_prep.sources import SourceRef

    colours = ["red", "blue", "green", "white", "black"]
    video = tmp_path / "flicker.mp4"
    inputs = [arg for c in colours for arg in ("-f", "lavfi", "-i", f"color=c={c}:s=64x64:r=25:d=0.6")]
    concat = "".join(f"[{i}:v]" for i in range(len(colours))) + f"concat=n={len(colours)}:v=1[v]"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", *inputs, "-filter_complex", concat, "-map", "[v]",
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", str(video)], check=True)
    cfg = load_ingest_config(None).model_copy(update={"scenes": load_ingest_config(None).scenes.model_copy(
        update={"min_scene_s": 1.0, "detector_min_frames": 5})})
    ds = tmp_path / "root" / "datasets" / "d"
    outcome = process_source(SourceRef(str(video), "file"), tmp_path / "root", ds, cfg)
    assert (outcome.status, outcome.stage) == ("failed", "scenes")
    assert outcome.reason == "no scene reached the minimum length of 1 s (4 cuts in 3.0 s)"
    assert outcome.cuts == [15, 30, 45, 60]  # every colour change, at 25 fps
    assert not list((ds / "clips").glob("*.mp4"))
    (record,) = [json.loads(p.read_text()) for p in (ds / "sources").glob("*.json")]
    assert record["rejected"] == {"stage": "scenes", "reason": outcome.reason} and record["cuts"] == outcome.cuts


def test_manifest_clip_paths_are_absolute_from_a_relative_data_root(tmp_path, monkeypatch):
    from data_prep.dataset import load_manifest
    from data_prep.synthetic import write_synthetic_dataset

    monkeypatch.chdir(tmp_path)
    write_synthetic_dataset(Path("data"), "d", num_clips=1, frames=4, size=16)
    (path,) = load_manifest(Path("data"), "d")["clip_abspath"]
    assert Path(path).is_absolute() and Path(path).is_file()


def test_io_errors_and_missing_codecs_at_probe_are_retried_not_recorded(tmp_path):
    """Only what the bytes decide is recorded as rejected: an I/O error (PyAV raises its own
    OSError subclasses) or a decoder this build lacks is an OSError, which ingest retries."""
    import errno

    import av

    from data_prep.probe import _raise_if_the_machines

    with pytest.raises(OSError):
        _raise_if_the_machines(av.error.OSError(errno.EIO, "Input/output error"))
    with pytest.raises(OSError, match="this PyAV/FFmpeg build cannot read it"):
        _raise_if_the_machines(av.error.DecoderNotFoundError(-1, "Decoder not found"))
    _raise_if_the_machines(av.error.InvalidDataError(-1, "Invalid data found when processing input"))  # the bytes'
