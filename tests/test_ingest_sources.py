import subprocess
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


def test_a_folder_scan_skips_the_data_root(tmp_path):
    """`mav ingest .` where . holds mav-data: its clips and downloads are not new sources."""
    (tmp_path / "mav-data" / "datasets" / "d" / "clips").mkdir(parents=True)
    for name in ("one.mp4", "mav-data/datasets/d/clips/c1.mp4", "mav-data/raw.mp4"):
        (tmp_path / name).write_bytes(b"x")
    refs = expand_sources([str(tmp_path), str(tmp_path / "mav-data" / "datasets")], EXT, tmp_path / "mav-data")
    assert [(Path(r.source).name, r.kind) for r in refs] == [("one.mp4", "file"), ("datasets", "unreadable")]
    assert refs[1].reason.startswith("folder is inside the data root")
    assert len(expand_sources([str(tmp_path)], EXT)) == 3  # without a data root, nothing is skipped


def test_url_lists_txt_csv_tsv_parquet(tmp_path):
    (tmp_path / "list.txt").write_text("# comment\nhttp://h/a.mp4\n\nhttps://h/b.mp4\nlocal.mp4\n")
    (tmp_path / "list.csv").write_text("caption,url\nx,http://h/c.mp4\ny,http://h/a.mp4\n")
    (tmp_path / "list.tsv").write_text("caption\turl\na, with a comma\thttp://h/e.mp4\n")
    pd.DataFrame({"url": ["http://h/d.mp4"]}).to_parquet(tmp_path / "list.parquet")
    refs = expand_sources([str(tmp_path / n) for n in ("list.txt", "list.csv", "list.parquet", "list.tsv")], EXT)
    sources = [r.source for r in refs]
    # repeats dropped, order kept, relative entries resolved against the list's folder
    assert sources == ["http://h/a.mp4", "https://h/b.mp4", str(tmp_path / "local.mp4"), "http://h/c.mp4",
                       "http://h/d.mp4", "http://h/e.mp4"]
    assert [r.kind for r in refs] == ["url", "url", "file", "url", "url", "url"]


def test_url_list_headers_are_found_however_written_and_never_taken_for_sources(tmp_path):
    (tmp_path / "spaced.csv").write_text("id, url\n1, http://h/a.mp4\n")
    (tmp_path / "webvid.csv").write_text("videoid,contentUrl,duration\n7,http://h/b.mp4,PT10S\n")
    (tmp_path / "unknown.csv").write_text("caption,link_to_video\na cat,http://h/c.mp4\n")
    (tmp_path / "bare.csv").write_text("http://h/d.mp4\nhttp://h/e.mp4\n")
    pd.DataFrame({"contentUrl": ["http://h/f.mp4"]}).to_parquet(tmp_path / "webvid.parquet")
    (tmp_path / "blank.csv").write_text("\nhttp://h/g.mp4\n")  # a blank first line
    # a blank line, or Excel's "sep=," line, before the header: the header was taken from it, and
    # every caption became a missing file
    (tmp_path / "blank_header.csv").write_text("\n,\nname,url\nclip h,http://h/h.mp4\n")
    (tmp_path / "excel.csv").write_text("sep=,\nname,url\nclip i,http://h/i.mp4\n")
    (tmp_path / "short.csv").write_text("a\nb,http://h/j.mp4\n")  # no header; a first row narrower than the rest
    import pyarrow as pa
    import pyarrow.parquet as pq

    # a column of bytes (parquet written without the UTF-8 annotation): "b'http:/h/k.mp4'" was a path
    pq.write_table(pa.table({"url": pa.array([b"http://h/k.mp4"], pa.binary())}), tmp_path / "bytes.parquet")
    names = ("spaced.csv", "webvid.csv", "unknown.csv", "bare.csv", "webvid.parquet", "blank.csv", "blank_header.csv",
             "excel.csv", "short.csv", "bytes.parquet")
    refs = expand_sources([str(tmp_path / n) for n in names], EXT)
    assert [r.source for r in refs] == [f"http://h/{c}.mp4" for c in "abcdefghijk"]


def test_a_column_named_url_wins_over_other_known_names_before_it(tmp_path):
    """A list that says where each video came from (`source`) or where it was saved (`path`)
    before its `url` column: the URLs are ingested, not the labels (which all became one missing file)."""
    (tmp_path / "labels.csv").write_text("source,url\nwebvid,http://h/a.mp4\nwebvid,http://h/b.mp4\n")
    (tmp_path / "saved.tsv").write_text("path\tlink\tcontentUrl\nv/c.mp4\thttp://h/page\thttp://h/c.mp4\n")
    pd.DataFrame({"source": ["webvid"], "url": ["http://h/d.mp4"]}).to_parquet(tmp_path / "labels.parquet")
    refs = expand_sources([str(tmp_path / n) for n in ("labels.csv", "saved.tsv", "labels.parquet")], EXT)
    assert [(r.source, r.kind) for r in refs] == [(f"http://h/{c}.mp4", "url") for c in "abcd"]


def test_a_parquet_list_without_a_known_column_name_takes_its_column_of_urls(tmp_path):
    """As a csv does (README: "without one, the column of URLs"); it was refused as having no url column."""
    pd.DataFrame({"id": [1, 2], "caption": ["a cat", None], "video": ["http://h/a.mp4", "http://h/b.mp4"]}).to_parquet(
        tmp_path / "list.parquet")
    refs = expand_sources([str(tmp_path / "list.parquet")], EXT)
    assert [(r.source, r.kind) for r in refs] == [("http://h/a.mp4", "url"), ("http://h/b.mp4", "url")]


def test_a_csv_without_a_header_keeps_a_first_url_that_ends_in_url(tmp_path):
    """A header is known by a name ending in "url": the first URL of a list without one, ending so, was
    taken for its header and dropped."""
    (tmp_path / "list.csv").write_text("http://h/a.mp4?src=myurl,x\nhttp://h/b.mp4,y\n")
    refs = expand_sources([str(tmp_path / "list.csv")], EXT)
    assert [r.source for r in refs] == ["http://h/a.mp4?src=myurl", "http://h/b.mp4"]


def test_a_name_with_a_colon_is_a_path_not_a_url_scheme(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "list.txt").write_text("v.1:x.mp4\n")
    refs = expand_sources(["take:2.mp4", str(tmp_path / "list.txt"), "s3://bucket/k.mp4"], EXT)
    assert [(r.source, r.kind) for r in refs] == [(str(tmp_path / "take:2.mp4"), "file"),
                                                  (str(tmp_path / "v.1:x.mp4"), "file"),
                                                  ("s3://bucket/k.mp4", "unsupported")]


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
    # (without a host or with a bad port, requests raised InvalidURL, reported as an unexpected error)
    (tmp_path / "good.txt").write_text("http://example.org/a.mp4\nhttp://[::1/b.mp4\nhttp://\nhttp:///c.mp4\n"
                                       "http://example.org:99999/d.mp4\n")
    refs = expand_sources([str(tmp_path / n) for n in ("bad.parquet", "latin1.txt", "broken.parquet", "good.txt")], EXT)
    assert [r.kind for r in refs] == ["unreadable"] * 3 + ["url"] + ["unreadable"] * 4
    assert [(r.source, r.reason) for r in refs[4:]] == [
        ("http://[::1/b.mp4", "not a valid URL (Invalid IPv6 URL)"), ("http://", "not a valid URL (no host)"),
        ("http:///c.mp4", "not a valid URL (no host)"),
        ("http://example.org:99999/d.mp4", "not a valid URL (Port out of range 0-65535)")]
    cfg = load_ingest_config(None)
    outcomes = [process_source(ref, tmp_path / "root", tmp_path / "root" / "datasets" / "d", cfg) for ref in refs[:3]]
    assert all(o.status == "failed" and o.stage == "download" for o in outcomes)
    assert [o.source for o in outcomes] == [str(tmp_path / n) for n in ("bad.parquet", "latin1.txt", "broken.parquet")]
    assert "URL list cannot be read: no url column (looked for url" in outcomes[0].reason
    assert "utf-8" in outcomes[1].reason


def test_a_source_whose_name_cannot_be_looked_up_is_a_failed_source_and_the_rest_go_on(tmp_path):
    """The OS refuses to stat it (a name over 255 bytes here; a folder on the way that may not be
    entered likewise): one failed source naming it, not an OSError that stops the whole ingest."""
    from data_prep.ingest import process_source

    (tmp_path / "ok.mp4").write_bytes(b"x")
    long_name = str(tmp_path / ("v" * 300 + ".mp4"))
    refs = expand_sources([long_name, str(tmp_path / "ok.mp4")], EXT)
    assert [(r.source, r.kind) for r in refs] == [(long_name, "unreadable"), (str(tmp_path / "ok.mp4"), "file")]
    outcome = process_source(refs[0], tmp_path / "root", tmp_path / "root" / "datasets" / "d", load_ingest_config(None))
    assert (outcome.status, outcome.stage, outcome.reason) == ("failed", "download", "cannot be read: File name too long")


def test_a_home_that_cannot_be_found_or_a_name_not_in_utf8_is_a_failed_source_and_the_rest_go_on(tmp_path):
    """`~nosuchuser/x.mp4` raised RuntimeError out of the whole ingest; a Latin-1 file name ("caf\\xe9.mp4",
    held as surrogates) failed in ffmpeg-python and then stopped every version from being written (the
    manifest could not hold its name). Each is now one failed source, named in a form UTF-8 can hold."""
    import os

    from data_prep.ingest import process_source

    latin = Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9.mp4"))
    latin.write_bytes(b"x")
    (tmp_path / "ok.mp4").write_bytes(b"x")
    refs = expand_sources(["~nosuchuser-of-mav/x.mp4", str(tmp_path)], EXT)
    assert [(r.source, r.kind) for r in refs] == [("~nosuchuser-of-mav/x.mp4", "unreadable"),
                                                  (f"{tmp_path}/caf\\xe9.mp4", "unreadable"),
                                                  (str(tmp_path / "ok.mp4"), "file")]
    assert refs[0].reason == "cannot expand ~ (no such user, or no home folder)"
    assert refs[1].reason == "its name is not valid UTF-8 (rename it)"
    outcome = process_source(refs[1], tmp_path / "root", tmp_path / "root" / "datasets" / "d", load_ingest_config(None))
    assert (outcome.status, outcome.stage) == ("failed", "download")
    outcome.source.encode("utf-8")  # what the version's failures.parquet and the log will hold


def test_other_schemes_are_marked_unsupported():
    (ref,) = expand_sources(["ftp://example/x.mp4"], EXT)
    assert ref.kind == "unsupported"


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "ingest.yaml"
    bad.write_text("scenes:\n  detector: magic\nclips:\n  short_sid: 3\n")
    with pytest.raises(ConfigError) as err:
        load_ingest_config(bad)
    assert "scenes.detector" in str(err.value) and "clips.short_sid" in str(err.value)


def test_config_values_that_cannot_work_are_errors_when_it_loads(tmp_path):
    """shard_max_clips: 0 failed the commit after every source was cut, short_side: 0 made 2x2
    clips, a negative fps failed every encode, retries: -1 made no try: each one line at load."""
    bad = tmp_path / "ingest.yaml"
    bad.write_text("shard_max_clips: 0\nclips:\n  short_side: 0\n  fps: -5\nscenes:\n  trim_frames: -1\n"
                   "download:\n  retries: -1\n  connect_timeout_s: 0\n")
    with pytest.raises(ConfigError) as err:
        load_ingest_config(bad)
    for key in ("shard_max_clips", "clips.short_side", "clips.fps", "scenes.trim_frames", "download.retries",
                "download.connect_timeout_s"):
        assert f"{key}: " in str(err.value)


def test_a_dataset_cut_before_a_setting_existed_keeps_its_clips_at_the_old_value():
    """Settings hashes that the last version before `scenes.dissolves` and `clips.keyframe_every`
    wrote (8344694: the default settings, and one other): with `dissolves: false` and
    `keyframe_every: 250`, which cut as that version did, the hash is the same, so the next ingest
    keeps those clips; at either new default they are cut again."""
    from data_prep.config import IngestConfig

    before = {"4f148d9181f1bcea": {}, "628724bb86803926": {"scenes": {"trim_frames": 1}, "clips": {"crop": "none"}}}
    for written, settings in before.items():
        old = {"scenes": {**settings.get("scenes", {}), "dissolves": False},
               "clips": {**settings.get("clips", {}), "keyframe_every": 250}}
        assert IngestConfig.model_validate(old).clip_settings_hash() == written
        assert IngestConfig.model_validate(settings).clip_settings_hash() != written
        for group, name in (("scenes", "dissolves"), ("clips", "keyframe_every")):  # each new default alone
            one_new = {**old, group: {k: v for k, v in old[group].items() if k != name}}
            assert IngestConfig.model_validate(one_new).clip_settings_hash() != written, name


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


def test_a_codec_this_build_cannot_decode_is_a_retried_failure_not_a_crash(tmp_path):
    """PyAV gives a stream without a codec context for a codec it lacks (here an AVI tagged ZZZZ):
    a failed probe naming the cause, not recorded, so a build that has the codec takes it later."""

    from data_prep.ffmpeg_bin import ffmpeg_exe
    from data_prep.ingest import process_source
    from data_prep.sources import SourceRef

    avi = tmp_path / "x.avi"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=25:duration=2",
                    "-c:v", "mpeg4", str(avi)], check=True)
    unknown = tmp_path / "unknown.avi"
    unknown.write_bytes(avi.read_bytes().replace(b"FMP4", b"ZZZZ"))
    ds = tmp_path / "root" / "datasets" / "d"
    outcome = process_source(SourceRef(str(unknown), "file"), tmp_path / "root", ds, load_ingest_config(None))
    assert (outcome.status, outcome.stage, outcome.rejected) == ("failed", "probe", False)
    assert outcome.reason == "this PyAV/FFmpeg build has no decoder for the video stream's codec"
    assert not (ds / "sources").exists() or not list((ds / "sources").iterdir())


def test_raw_h264_and_hevc_streams_are_cut_like_any_video(tmp_path):
    """Elementary streams (.h264 / .hevc, no container) carry no packet timestamps: frames are
    counted by packet on the stream's rate. A rejection recorded before that (rules 1) is retried."""
    import json

    import av

    from data_prep.dataset import source_record_path
    from data_prep.ffmpeg_bin import ffmpeg_exe
    from data_prep.download import sha256_file
    from data_prep.ingest import process_source
    from data_prep.sources import SourceRef

    cfg = load_ingest_config(None)
    ds = tmp_path / "root" / "datasets" / "d"
    for codec, fmt in (("libx264", "h264"), ("libx265", "hevc")):
        stream = tmp_path / f"clip.{fmt}"
        done = subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i",
                               "testsrc=size=96x64:rate=25:duration=4", "-c:v", codec, "-f", fmt, str(stream)],
                              capture_output=True)
        if done.returncode != 0:
            assert codec == "libx265", done.stderr  # x265 is optional in an ffmpeg build
            continue
        digest = sha256_file(stream)
        old = {"source_sha256": digest, "source": str(stream), "cuts": [],
               "rejected": {"stage": "probe", "reason": "video stream has no frames"}}
        record = source_record_path(ds, digest, cfg.clip_settings_hash())
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(old))
        outcome = process_source(SourceRef(str(stream), "file"), tmp_path / "root", ds, cfg)
        assert outcome.status == "new", outcome.reason
        assert outcome.probe["num_frames"] == 100 and outcome.probe["fps"] == 25.0
        assert sum(c["num_frames"] for c in outcome.clips) == 100
        with av.open(str(ds / outcome.clips[0]["clip_path"])) as clip:
            assert sum(1 for _ in clip.decode(video=0)) == outcome.clips[0]["num_frames"]
        assert json.loads(record.read_text()).get("rejected") is None


def test_the_main_video_stream_is_cut_not_a_picture_beside_it(tmp_path):
    """A one-frame picture stream before the video (as ffmpeg's stream choice, not stream 0), and a
    song whose only video stream is its cover picture: no video, said so."""

    from data_prep.ffmpeg_bin import ffmpeg_exe
    from data_prep.ingest import process_source
    from data_prep.sources import SourceRef

    exe, cfg, ds = ffmpeg_exe(), load_ingest_config(None), tmp_path / "root" / "datasets" / "d"
    two = tmp_path / "picture_first.mkv"
    subprocess.run([exe, "-v", "error", "-y", "-f", "lavfi", "-i", "color=red:s=64x64:d=0.04", "-f", "lavfi", "-i",
                    "testsrc=size=96x64:rate=25:duration=3", "-map", "0", "-map", "1", "-c:v:0", "png",
                    "-c:v:1", "libx264", str(two)], check=True)
    outcome = process_source(SourceRef(str(two), "file"), tmp_path / "root", ds, cfg)
    assert outcome.status == "new", outcome.reason
    assert outcome.probe["num_frames"] == 75 and [c["num_frames"] for c in outcome.clips] == [75]
    song = tmp_path / "song.mp4"
    subprocess.run([exe, "-v", "error", "-y", "-f", "lavfi", "-i", "sine=duration=2", "-f", "lavfi", "-i",
                    "color=blue:s=64x64:d=0.04", "-map", "0", "-map", "1", "-c:a", "aac", "-c:v", "mjpeg",
                    "-disposition:v:0", "attached_pic", str(song)], check=True)
    outcome = process_source(SourceRef(str(song), "file"), tmp_path / "root", ds, cfg)
    assert (outcome.status, outcome.stage) == ("failed", "probe")
    assert outcome.reason == "no video stream (a cover picture only)"


def test_a_done_source_missing_a_clip_file_is_cut_again_to_the_same_clips(tmp_path):
    """A rerun trusted the record and left the manifest naming a clip file that was gone."""
    from data_prep.ffmpeg_bin import ffmpeg_exe
    from data_prep.ingest import process_source
    from data_prep.sources import SourceRef

    video, ds = tmp_path / "cuts.mp4", tmp_path / "root" / "datasets" / "d"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=96x64:rate=12:duration=2",
                    "-f", "lavfi", "-i", "color=red:size=96x64:rate=12:duration=2", "-filter_complex",
                    "[0][1]concat=n=2", str(video)], check=True)  # two shots: two clips
    cfg, ref = load_ingest_config(None).model_copy(update={"workers": 1}), SourceRef(str(video), "file")
    first = process_source(ref, tmp_path / "root", ds, cfg)
    assert first.status == "new" and len(first.clips) == 2, first.reason
    gone = ds / first.clips[0]["clip_path"]
    gone.unlink()
    again = process_source(ref, tmp_path / "root", ds, cfg)
    assert again.status == "new" and gone.is_file()
    assert [c["clip_id"] for c in again.clips] == [c["clip_id"] for c in first.clips]
    assert process_source(ref, tmp_path / "root", ds, cfg).status == "unchanged"


def test_a_damaged_version_file_is_named(tmp_path):
    """A dataset.json damaged outside the ingest: "Expecting value: line 1 column 1" named no file."""
    from data_prep.dataset import DatasetError, latest_version, shard_paths
    from data_prep.synthetic import write_synthetic_dataset

    ds = write_synthetic_dataset(tmp_path, "d", num_clips=1, frames=4, size=16, fps=12)
    info = ds / "versions" / latest_version(ds) / "dataset.json"
    info.write_text("garbage")
    with pytest.raises(DatasetError, match=rf"{info}: not readable JSON \(Expecting value"):
        shard_paths(tmp_path, "d")


def test_new_bytes_at_a_path_replace_its_clips_unless_another_path_gives_them_again(tmp_path):
    from data_prep.dataset import commit_version, load_manifest
    from data_prep.synthetic import write_synthetic_dataset

    ds = write_synthetic_dataset(tmp_path, "d", num_clips=2, frames=4, size=16, fps=12)
    a, b = load_manifest(tmp_path, "d").drop(columns=["clip_abspath", "shard"]).to_dict("records")
    edited = {**a, "clip_id": "e" * 16, "source_sha256": "e" * 64, "clip_path": "clips/edited.mp4"}
    (ds / edited["clip_path"]).write_bytes((ds / a["clip_path"]).read_bytes())

    # a's path now holds other bytes; another path holds a's old bytes and gives its clip again
    commit_version(ds, [edited, {**a, "source": "/elsewhere.mp4"}], [], {}, 8, frozenset(),
                   {a["source"]: edited["source_sha256"], "/elsewhere.mp4": a["source_sha256"]})
    listed = load_manifest(tmp_path, "d").set_index("clip_id")["source"].to_dict()
    assert listed == {a["clip_id"]: "/elsewhere.mp4", b["clip_id"]: b["source"], edited["clip_id"]: a["source"]}
    # the same path edited again, alone: its earlier clip leaves, the other path's stays
    again = {**edited, "clip_id": "f" * 16, "source_sha256": "f" * 64, "clip_path": "clips/again.mp4"}
    (ds / again["clip_path"]).write_bytes((ds / a["clip_path"]).read_bytes())
    commit_version(ds, [again], [], {}, 8, frozenset(), {a["source"]: again["source_sha256"]})
    listed = load_manifest(tmp_path, "d").set_index("clip_id")["source"].to_dict()
    assert listed == {a["clip_id"]: "/elsewhere.mp4", b["clip_id"]: b["source"], again["clip_id"]: a["source"]}


def test_the_same_bytes_at_two_paths_are_cut_once_even_at_once(tmp_path, samples):
    """Two workers on two copies of one video: one cuts, the other waits and finds its record
    (before, both cut the same clip files at once, and a failing one deleted what the other listed)."""
    import json
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    from data_prep.ingest import merge_same_bytes, process_source
    from data_prep.sources import SourceRef

    for name in ("a.mkv", "b.mkv"):
        shutil.copy(samples / "asl_book.mkv", tmp_path / name)
    cfg, ds = load_ingest_config(None), tmp_path / "root" / "datasets" / "d"
    refs = [SourceRef(str(tmp_path / name), "file") for name in ("b.mkv", "a.mkv")]
    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(lambda ref: process_source(ref, tmp_path / "root", ds, cfg), refs))
    assert sorted(o.status for o in outcomes) == ["new", "unchanged"]
    assert outcomes[0].clips and [c["clip_id"] for c in outcomes[0].clips] == [c["clip_id"] for c in outcomes[1].clips]
    (record,) = [json.loads(p.read_text()) for p in (ds / "sources").glob("*.json")]
    assert all((ds / clip["clip_path"]).is_file() for clip in record["clips"])
    assert sorted(p.name for p in (ds / "clips").iterdir()) == sorted(f"{c['clip_id']}.mp4" for c in record["clips"])
    assert not (ds / ".locks").exists() or not any((ds / ".locks").iterdir())  # lock files live only while held

    # reported as one source, whoever cut it and whatever order they were given in
    b, a = merge_same_bytes(outcomes)
    assert (a.status, b.status) == ("new", "duplicate") and b.reason == f"same bytes as {a.source}"
    assert {c["source"] for c in a.clips} == {a.source} and not b.clips
    assert merge_same_bytes(outcomes[::-1]) == [a, b]


def test_same_bytes_are_one_source_whichever_cut_them_and_failed_ones_stay_failed():
    from data_prep.ingest import SourceOutcome, merge_same_bytes

    clip = {"clip_id": "c" * 16, "source": "/x/b.mp4", "source_sha256": "s" * 64}
    cut_by_b = [SourceOutcome("/x/b.mp4", "new", "s" * 64, clips=[clip]),
                SourceOutcome("/x/a.mp4", "unchanged", "s" * 64, clips=[{**clip, "source": "/x/a.mp4"}]),
                SourceOutcome("https://h/a.mp4", "failed", stage="download", reason="HTTP 404 Not Found")]
    merged = merge_same_bytes(cut_by_b)
    assert [(o.source, o.status) for o in merged] == [
        ("/x/b.mp4", "duplicate"), ("/x/a.mp4", "new"), ("https://h/a.mp4", "failed")]
    assert merged[1].clips == [{**clip, "source": "/x/a.mp4"}]
    # a transient failure under one name and a cut under the other: the bytes were cut
    flaky = [SourceOutcome("/x/a.mp4", "failed", "s" * 64, stage="decode", reason="out of memory"),
             SourceOutcome("/x/b.mp4", "new", "s" * 64, clips=[clip])]
    assert [(o.status, o.clips) for o in merge_same_bytes(flaky)] == [
        ("new", [{**clip, "source": "/x/a.mp4"}]), ("duplicate", [])]
    # rejected under both names: the first's rejection speaks for both, the other is its duplicate
    bad = [SourceOutcome(s, "failed", "r" * 64, stage="probe", reason="empty file (0 bytes)", rejected=True)
           for s in ("/x/z.mp4", "/x/y.mp4")]
    assert [(o.status, o.reason) for o in merge_same_bytes(bad)] == [
        ("duplicate", "same bytes as /x/y.mp4"), ("failed", "empty file (0 bytes)")]
