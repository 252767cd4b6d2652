"""`mav evaluate` end to end on real videos: folders in, metrics + pictures in a sqlite MLflow store."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flows.eval_sources import read_prompts, resolve_source


@pytest.fixture()
def two_folders(tmp_path, samples):
    """The bundled sample videos (a user's clone has them too), two real and two "fake"."""
    real, fake = tmp_path / "real", tmp_path / "fake"
    real.mkdir(), fake.mkdir()
    for name in ("big_buck_bunny_0_30.webm", "bottle-detection.mp4"):
        shutil.copy(samples / name, real / name)
    for name in ("bigbuckbunny.mp4", "asl_book.mkv"):
        shutil.copy(samples / name, fake / name)
    prompts = {"bigbuckbunny": "a rabbit in a meadow", "asl_book.mkv": "a person signing the word book"}
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    return real, fake, tmp_path / "prompts.json"


def test_cli_end_to_end(prefect_server, tmp_path, two_folders, capsys, monkeypatch):
    import mlflow

    from flows.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    real, fake, prompts = two_folders
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = main(["evaluate", "--real", str(real), "--fake", str(fake), "--prompts", str(prompts),
               "--metrics", "fvd,clipsim", "--clip", "tiny", "--tracking-uri", uri, "--clip-length", "10",
               "--bootstrap", "20", "--device", "cpu"])
    assert rc == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-2].startswith("fvd: ") and out[-2].split()[1].replace(".", "").isdigit()
    assert out[-1].startswith("clipsim: ")
    assert all("(smoke)" in line and "[" in line for line in out[-2:])

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("evaluate").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    m, p = run.data.metrics, run.data.params
    # smoke values are logged under smoke_* names only
    assert set(m) == {"smoke_fvd", "smoke_fvd_low", "smoke_fvd_high",
                      "smoke_clipsim", "smoke_clipsim_low", "smoke_clipsim_high"}
    assert m["smoke_fvd"] > 0 and m["smoke_fvd_low"] <= m["smoke_fvd"] <= m["smoke_fvd_high"]
    assert -1 <= m["smoke_clipsim"] <= 1
    assert float(out[-2].split()[1]) == pytest.approx(m["smoke_fvd"], rel=1e-3)
    assert p["clip_length"] == "10" and p["num_real"] == "2" and p["num_fake"] == "2"
    assert p["smoke"] == "True" and p["detector_sha256"] == "random" and "bilinear 224" in p["resize"]
    assert run.data.tags["mav.smoke"] == "true"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/grid.mp4", "eval/grid.gif", "eval/contact_sheet.png", "eval/results.json"} <= artifacts

    # the run's artifacts are themselves a source: its grid pictures are not taken for samples
    with pytest.raises(ValueError, match="no video artifacts"):
        resolve_source(f"runs:/{run.info.run_id}", tracking_uri=uri)


def test_bad_sources_and_prompts(tmp_path):
    with pytest.raises(ValueError, match="nope: not a folder, an MLflow run"):
        resolve_source("nope", data_root=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="folder holds no videos"):
        resolve_source(str(tmp_path / "empty"))
    p = tmp_path / "p.txt"
    p.write_text("one\ntwo\n")
    with pytest.raises(ValueError, match="2 prompts for 3 videos"):
        read_prompts(p, [tmp_path / f"{i}.mp4" for i in range(3)])


def test_gif_previews_beside_their_videos_are_not_scored(tmp_path):
    """`mav sample` writes sample-0000.mp4 and its preview sample-0000.gif: one video each, and the
    prompts line up with the videos; a GIF with no video beside it is a video of its own."""
    import numpy as np

    from models.video_io import write_gif, write_mp4

    frames = np.zeros((4, 16, 16, 3), dtype=np.uint8)
    for i in range(2):
        write_mp4(frames, tmp_path / f"sample-{i:04d}.mp4", fps=4)
        write_gif(frames, tmp_path / f"sample-{i:04d}.gif", fps=4)
    write_gif(frames, tmp_path / "only.gif", fps=4)
    (tmp_path / "prompts.txt").write_text("a cat\na dog\na gif\n")
    videos = resolve_source(str(tmp_path))
    assert [p.name for p in videos.paths] == ["only.gif", "sample-0000.mp4", "sample-0001.mp4"]
    assert videos.prompts == ["a cat", "a dog", "a gif"]


def test_a_folder_of_videos_from_several_sampling_runs_is_refused(tmp_path):
    """`mav sample` into a folder keeps an earlier run's videos; samples.json says what sampled each
    one. Scored as one set they are refused where their checkpoints or settings differ, or where a
    video is missing from it beside listed ones; other seeds and prompts of one model are fine."""
    import re

    import numpy as np

    from models.video_io import write_mp4

    def run(decoder="/ckpts/decoder.ckpt", mtime_ns=1, steps=None):
        return {"checkpoints": {"prior": {"path": "/ckpts/prior.ckpt", "size": 10, "mtime_ns": 1},
                                "decoder": {"path": decoder, "size": 20, "mtime_ns": mtime_ns}},
                "steps": steps, "guidance": None, "lowres_noise": None}

    def folder(name, records, videos=("sample-0000.mp4", "sample-0001.mp4", "sample-0002.mp4")):
        where = tmp_path / name
        for video in videos:
            write_mp4(np.zeros((4, 16, 16, 3), dtype=np.uint8), where / video, fps=4)
        (where / "samples.json").write_text(records if isinstance(records, str) else json.dumps(
            {video: {"prompt": "a cat", "seed": seed, "sampled_with": settings} for video, seed, settings in records}))
        return str(where)

    one_model = folder("one", [("sample-0000.mp4", 5, run()), ("sample-0001.mp4", 1, run()),
                               ("sample-0002.mp4", 2, run())])
    assert len(resolve_source(one_model).paths) == 3
    cases = [
        ([("sample-0000.mp4", 0, run()), ("sample-0001.mp4", 1, run(steps=2)), ("sample-0002.mp4", 2, run())],
         "its videos come from 2 sampling runs with different steps (sample-0000.mp4 and sample-0001.mp4; see "),
        ([("sample-0000.mp4", 0, run()), ("sample-0001.mp4", 1, run(decoder="/other/decoder.ckpt")),
          ("sample-0002.mp4", 2, run(mtime_ns=2))],  # the same path, rewritten by a resumed training
         "its videos come from 3 sampling runs with different decoder checkpoint (sample-0000.mp4 and "),
        ([("sample-0000.mp4", 0, run()), ("sample-0001.mp4", 1, run())],  # a run stopped part way
         "sample-0002.mp4 is not in samples.json beside videos that are: it is not from the run that sampled them"),
        ("{not json", "{where}/samples.json is not a samples record (Expecting property name"),
        ('{"sample-0000.mp4": "a cat"}', "{where}/samples.json is not a samples record (expected {{video file name: "),
    ]
    for i, (records, message) in enumerate(cases):
        where = tmp_path / str(i)
        with pytest.raises(ValueError, match=re.escape(f"{where}: " + message.format(where=where))):
            resolve_source(folder(str(i), records))


def test_a_prompts_file_that_does_not_fit_matters_only_where_prompts_are_needed(tmp_path):
    """A sidecar that misses a video added later: FVD alone and --prompts go on; CLIPSIM and the
    protocols say what is wrong with it. Prompts that are not text are named."""
    import numpy as np

    from flows.cli import build_parser
    from flows.evaluate import check_inputs
    from models.video_io import write_mp4

    def parse_args(options):
        return build_parser("evaluate").parse_args(["evaluate", *options])

    fake = tmp_path / "fake"
    for name in ("a", "b"):  # (16 frames: FVD's clips)
        write_mp4(np.zeros((16, 16, 16, 3), dtype=np.uint8), fake / f"{name}.mp4", fps=4)
    (fake / "prompts.json").write_text(json.dumps({"a.mp4": "a cat"}))  # b.mp4 came later
    videos = resolve_source(str(fake))
    assert videos.prompts is None and "prompts.json: no prompt for" in videos.prompts_error
    check_inputs(parse_args(["--real", str(fake), "--fake", str(fake), "--metrics", "fvd"]))
    full = tmp_path / "full.json"
    full.write_text(json.dumps({"a.mp4": "a cat", "b.mp4": "a dog"}))
    check_inputs(parse_args(["--fake", str(fake), "--metrics", "clipsim", "--prompts", str(full)]))
    (fake / "b.mp4").write_text("not a video")  # CLIPSIM alone found it while scoring, after the others
    with pytest.raises(ValueError, match=r"\S+b.mp4: not a readable video"):
        check_inputs(parse_args(["--fake", str(fake), "--metrics", "clipsim", "--prompts", str(full)]))
    write_mp4(np.zeros((16, 16, 16, 3), dtype=np.uint8), fake / "b.mp4", fps=4)
    ucf101 = ["--protocol", "ucf101", "--protocol-root", str(tmp_path)]
    for options, why in ((["--metrics", "clipsim"], "clipsim"), (ucf101, "the ucf101 protocol")):
        with pytest.raises(ValueError, match=f"{why} needs the prompts of the fake videos: pass --prompts FILE "
                                             r"\(\S+prompts.json: no prompt for \S+b.mp4\)"):
            check_inputs(parse_args(["--fake", str(fake), *options]))
    (fake / "prompts.json").unlink()
    with pytest.raises(ValueError, match=r"ucf101 protocol needs the prompts .*\(none found with"):
        check_inputs(parse_args(["--fake", str(fake), *ucf101]))
    full.write_text(json.dumps({"a.mp4": "a cat", "b.mp4": None}))
    with pytest.raises(ValueError, match="full.json: the prompt for 'b.mp4' is not text"):
        read_prompts(full)
    with pytest.raises(ValueError, match="no metrics given"):
        check_inputs(parse_args(["--fake", str(fake), "--metrics", ","]))


def test_a_missing_dataset_version_is_a_clean_cli_error(prefect_server, tmp_path, two_folders, capsys):
    from flows.cli import main

    _, fake, _ = two_folders
    (tmp_path / "data" / "datasets" / "clips").mkdir(parents=True)
    rc = main(["evaluate", "--real", "clips@deadbeef", "--fake", str(fake), "--metrics", "fvd",
               "--data-root", str(tmp_path / "data"), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    assert rc == 2
    assert "error: dataset 'clips' has no version 'deadbeef'" in capsys.readouterr().err


def test_sampler_hook_makes_the_fake_set(tmp_path, samples):
    """evaluate(sampler=...): a user's own sampler (here one that copies a video) makes the fake
    set; the tiny chain's own sampling is tested in test_models_stages."""
    from flows.evaluate import sample_videos

    calls = []

    def sampler(prompt, checkpoints, out, steps, guidance, seed, device):
        calls.append((prompt, checkpoints, steps, guidance, seed, device))
        shutil.copy(samples / "bigbuckbunny.mp4", out)
        return out

    made = sample_videos.fn(["a cat", "a dog"], sampler, {"decoder": "ckpt"}, str(tmp_path / "s"), 3, 2.0, 5, "cpu")
    assert [p.name for p in made.paths] == ["sample-00000.mp4", "sample-00001.mp4"]
    assert made.prompts == ["a cat", "a dog"] and [c[4] for c in calls] == [5, 6]
    assert json.loads((tmp_path / "s" / "samples.json").read_text()) == \
        {"sample-00000.mp4": {"prompt": "a cat", "seed": 5}, "sample-00001.mp4": {"prompt": "a dog", "seed": 6}}
    # the folder it wrote is itself a source, prompts included
    again = resolve_source(str(tmp_path / "s"))
    assert again.prompts == ["a cat", "a dog"]


def test_a_failed_or_stopped_evaluation_leaves_its_run_failed_or_killed(prefect_server, tmp_path, samples):
    """The evaluation's MLflow run opens with the flow: one that fails after hours of sampling is in the
    store as FAILED with its error (and where the sampled videos are kept), one stopped as KILLED;
    before, either left no run at all."""
    import mlflow

    from flows.evaluate import evaluate

    def sampler(prompt, checkpoints, out, steps, guidance, seed, device):
        shutil.copy(samples / "bigbuckbunny.mp4", out)
        return out

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    missing_clip = tmp_path / "no-clip-here"
    with pytest.raises(Exception) as failed:  # CLIP loads after the videos are sampled
        evaluate(prompts=str(prompts), sampler=sampler, metrics="clipsim", clip_model=str(missing_clip),
                 tracking_uri=uri, num_resamples=0, experiment="ev")
    kept = Path(failed.value.__notes__[-1].removeprefix("the sampled videos are kept in "))
    assert sorted(p.name for p in kept.glob("*.mp4")) == ["sample-00000.mp4", "sample-00001.mp4"]
    shutil.rmtree(kept)

    def stopped_sampler(*_, **__):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate(prompts=str(prompts), sampler=stopped_sampler, metrics="clipsim", clip_model="tiny",
                 tracking_uri=uri, num_resamples=0, experiment="ev")
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ev").experiment_id], order_by=["start_time ASC"])
    assert [r.info.status for r in runs] == ["FAILED", "KILLED"]
    assert [r.data.tags["mav.kind"] for r in runs] == ["evaluate", "evaluate"]
    error = runs[0].data.tags["mav.error"]
    assert str(missing_clip) in error and f"the sampled videos are kept in {kept}" in error
    assert "mav.error" not in runs[1].data.tags  # stopped, not failed


def test_log_task_nests_under_an_active_parent_run(tmp_path):
    """The pipeline calls evaluate inside its own active MLflow run: logging must not clash with it."""
    import mlflow

    from eval.fvd import FVDResult
    from flows.evaluate import evaluation_run, log_task
    from flows.tracking import use_experiment

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    use_experiment(uri, "parent")  # fluent MLflow, without exporting MLFLOW_TRACKING_URI to later tests
    r = FVDResult(12.5, 10.0, 15.0, 0.95, 4, 4, 16, 1, False, "i3d.pt", "abc", False)
    with mlflow.start_run() as parent:
        with evaluation_run(uri, "evaluate", parent.info.run_id, "evaluate") as run_id:
            assert mlflow.MlflowClient(uri).get_run(run_id).info.status == "RUNNING"
            log_task.fn(run_id, {"fvd": r}, {"clip_length": 16}, [], uri)
        assert mlflow.active_run().info.run_id == parent.info.run_id
    run = mlflow.MlflowClient(uri).get_run(run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.data.metrics == {"fvd": 12.5, "fvd_low": 10.0, "fvd_high": 15.0}  # real: no smoke_ prefix
    assert run.info.status == "FINISHED"


def test_the_evaluate_run_names_its_code_as_the_training_runs_do(tmp_path):
    """An FVD is compared with others of the same code: the evaluate run gets the user, source and git
    commit tags that mlflow.start_run gives the pipeline's and the stages' runs."""
    import mlflow

    from flows.evaluate import evaluation_run
    from flows.tracking import use_experiment

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    use_experiment(uri, "parent")
    with mlflow.start_run() as parent:
        with evaluation_run(uri, "evaluate", parent.info.run_id, "evaluate") as run_id:
            pass
    client = mlflow.MlflowClient(uri)
    trained, scored = client.get_run(parent.info.run_id).data.tags, client.get_run(run_id).data.tags
    context = {k: v for k, v in trained.items() if k == "mlflow.user" or k.startswith("mlflow.source.")}
    assert {"mlflow.user", "mlflow.source.name", "mlflow.source.type"} <= set(context)  # (git: where there is one)
    assert {k: scored.get(k) for k in context} == context


def _moving_stripes(folder, fps: float, step: int, frames: int, count: int = 3):
    """Videos of stripes moving at their own speed; frame k shows time k * step / 30 s, at `fps`
    (step 1 at 30 fps and step 2 at 15 fps: the same motion)."""
    import numpy as np

    from models.video_io import write_mp4

    folder.mkdir()
    x = np.arange(32)[None, None, :, None]
    t = (np.arange(frames) * step)[:, None, None, None]
    for i in range(count):
        grey = 128 + 100 * np.sin(2 * np.pi * (x + (i + 1) * t) / 16) + 0 * np.arange(32)[None, :, None, None]
        write_mp4(np.repeat(grey, 3, axis=3).astype(np.uint8), folder / f"v{i}.mp4", fps=fps, crf=0)
    return folder


def test_videos_sampled_before_log_their_sampler_settings_as_sampling_does(prefect_server, tmp_path):
    """The pipeline's evaluate step scores the folder it sampled into, `mav evaluate --fake` a folder of
    `mav sample` or a run's samples/: their samples.json says how they were sampled, and the run logs it
    under the names `mav evaluate --checkpoints` uses, so the runs compare on sample steps and guidance."""
    import mlflow

    from flows.evaluate import evaluate
    from models.sampling import sampling_settings

    fake = _moving_stripes(tmp_path / "fake", fps=10, step=1, frames=4, count=2)
    for stage in ("prior", "decoder"):  # (only their path, size and time are recorded)
        (tmp_path / f"{stage}.ckpt").write_bytes(b"weights")
    settings = sampling_settings({"prior": tmp_path / "prior.ckpt", "decoder": tmp_path / "decoder.ckpt"}, 3, None,
                                 None)
    (fake / "samples.json").write_text(json.dumps(
        {f"v{i}.mp4": {"prompt": f"stripes {i}", "seed": i, "sampled_with": settings} for i in range(2)}))
    (fake / "prompts.json").write_text(json.dumps({f"v{i}.mp4": f"stripes {i}" for i in range(2)}))
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = mlflow.MlflowClient(uri)
    expected = {"sample_steps": "3", "guidance": "per stage config",
                "checkpoints": f"prior={tmp_path / 'prior.ckpt'},decoder={tmp_path / 'decoder.ckpt'}"}
    out = evaluate(fake=str(fake), metrics="clipsim", clip_model="tiny", tracking_uri=uri, num_resamples=0)
    params = client.get_run(out["run_id"]).data.params
    assert {k: params.get(k) for k in expected} == expected
    # a run's samples/ (a pipeline run's): the same
    run = client.create_run(client.create_experiment("samples"))
    client.log_artifacts(run.info.run_id, str(fake), "samples")
    out = evaluate(fake=f"runs:/{run.info.run_id}", metrics="clipsim", clip_model="tiny", tracking_uri=uri,
                   num_resamples=0)
    params = client.get_run(out["run_id"]).data.params
    assert {k: params.get(k) for k in expected} == expected


def test_fps_puts_real_and_fake_clips_on_one_time_scale(prefect_server, tmp_path, capsys):
    """Real videos at 30 fps, fakes of the same motion at 15 fps: at --fps 15 their clips are the same
    frames and FVD is far smaller than comparing frames as decoded (twice the motion per frame in the
    fakes); the rate is logged with the clip settings."""
    import mlflow

    from flows.cli import main

    real = _moving_stripes(tmp_path / "real", 30, step=1, frames=20)
    fake = _moving_stripes(tmp_path / "fake", 15, step=2, frames=10)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    values = {}
    for fps in ([], ["--fps", "15"]):
        rc = main(["evaluate", "--real", str(real), "--fake", str(fake), "--metrics", "fvd", "--tracking-uri", uri,
                   "--clip-length", "10", "--bootstrap", "0", "--device", "cpu", *fps])
        assert rc == 0
        values[bool(fps)] = float(capsys.readouterr().out.strip().splitlines()[-1].split()[1])
    assert values[True] < values[False] / 100
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("evaluate").experiment_id], order_by=["start_time"])
    assert [(r.data.params["clip_fps"], r.data.params["clip_length"]) for r in runs] == [("native", "10"),
                                                                                         ("15.0", "10")]
    results = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=runs[1].info.run_id, tracking_uri=uri,
                                                                  artifact_path="eval/results.json")).read_text())
    assert results["fvd"]["clip_fps"] == 15.0


def test_a_video_too_short_at_the_fps_is_named_before_decoding(tmp_path):
    """20 frames at 30 fps hold a 16-frame clip as decoded, but only 10 frames at 15 fps."""
    from flows.cli import build_parser
    from flows.evaluate import check_inputs

    videos = _moving_stripes(tmp_path / "v", 30, step=1, frames=20, count=2)
    options = ["evaluate", "--real", str(videos), "--fake", str(videos), "--metrics", "fvd", "--clip-length", "16"]
    check_inputs(build_parser("evaluate").parse_args(options))
    with pytest.raises(ValueError, match=r"v0.mp4: 10 frames at 15 fps, shorter than one clip \(--clip-length 16, "
                                         r"--clip-stride 1, --fps 15: 16 frames\)"):
        check_inputs(build_parser("evaluate").parse_args([*options, "--fps", "15"]))
    with pytest.raises(SystemExit):  # a usage error
        build_parser("evaluate").parse_args([*options, "--fps", "0"])


def test_the_pipeline_config_takes_an_evaluation_fps(tmp_path):
    from flows.pipeline_config import REPO, load_pipeline_config

    assert load_pipeline_config(REPO / "configs" / "tiny" / "pipeline.yaml").evaluate.fps is None
    config = tmp_path / "pipeline.yaml"
    config.write_text("evaluate: {fps: 20}\n")
    assert load_pipeline_config(config).evaluate.fps == 20
    config.write_text("evaluate: {fps: 0}\n")
    with pytest.raises(ValueError, match=r"evaluate.fps"):
        load_pipeline_config(config)


def test_a_short_video_of_an_mlflow_run_is_named_before_decoding(tmp_path):
    """`--fake runs:/<id>` is fetched in the flow, after check_inputs: its videos were only found too
    short once every real video had been decoded and scored (score_files' error: "... (16 frames,
    stride 1)"); the flow checks them first, with the options' names (check_clip_lengths' error)."""
    import mlflow

    from flows.evaluate import evaluate

    real = _moving_stripes(tmp_path / "real", 30, step=1, frames=40, count=2)
    fake = _moving_stripes(tmp_path / "fake", 30, step=1, frames=20, count=2)  # 10 frames at 15 fps
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run = client.create_run(client.create_experiment("samples"))
    client.log_artifacts(run.info.run_id, str(fake), "samples")
    with pytest.raises(ValueError, match=r"v0.mp4: 10 frames at 15 fps, shorter than one clip \(--clip-length 16"):
        evaluate.fn(real=str(real), fake=f"runs:/{run.info.run_id}", metrics="fvd", tracking_uri=uri, fps=15,
                    device="cpu")


def test_a_ctrl_c_inside_an_mlflow_query_still_ends_the_evaluate_run_killed(tmp_path):
    """As for the pipeline's runs (test_pipeline): a Ctrl-C landing in a query of the SQLite store while
    the evaluation logs left a closed connection's cursor, kept by the interrupt's traceback, holding the
    file's lock, and ending the run KILLED failed after MLflow's 20 s wait ('database is locked'). A real
    SIGINT, sent when the store's first SELECT of the runs table after the run was created has executed."""
    import time

    from mlflow import MlflowClient

    from eval.fvd import FVDResult
    from flows.evaluate import evaluation_run, log_task
    from tests.interrupts import CtrlCInRunsQuery

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    r = FVDResult(12.5, 10.0, 15.0, 0.95, 4, 4, 16, 1, False, "i3d.pt", "abc", False)
    with CtrlCInRunsQuery(arm_on_insert=True) as ctrl_c:
        with pytest.raises(KeyboardInterrupt):
            with evaluation_run(uri, "evaluate", "a-parent", "evaluate") as run_id:
                log_task.fn(run_id, {"fvd": r}, {"clip_length": 16}, [], uri)
        assert ctrl_c.sent_at is not None, "the interrupt was never sent"
        # from the interrupt (not from the store's creation, which a loaded machine makes slow)
        assert time.monotonic() - ctrl_c.sent_at < 15  # not after MLflow's 20 s wait for the lock
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("evaluate").experiment_id])
    assert run.info.status == "KILLED"


@pytest.fixture()
def no_flow(monkeypatch):
    """`mav evaluate` with its flow replaced by one that fails: what is refused, is refused before it."""
    import flows.evaluate

    def flow(**_):
        raise AssertionError("the flow started")

    monkeypatch.setattr(flows.evaluate, "evaluate", flow)


def test_weights_and_clip_are_checked_before_the_flow(no_flow, tmp_path, capsys):
    """A missing or wrong --i3d-weights, --c3d-weights or --clip was found in the flow, after sampling
    the videos, behind Prefect's traces: it is a one-line error (exit 2) before the flow starts; the
    weights of a metric not scored are not read."""
    import torch

    from flows.cli import main

    videos = _moving_stripes(tmp_path / "v", 30, step=1, frames=20, count=2)
    (videos / "prompts.json").write_text(json.dumps({"v0.mp4": "a cat", "v1.mp4": "a dog"}))
    checkpoint = tmp_path / "last.ckpt"  # a training checkpoint, not a detector's weights
    torch.save({"state_dict": {"prior.net.weight": torch.zeros(2)}, "epoch": 3}, checkpoint)
    text, none, linear = tmp_path / "notes.txt", tmp_path / "none.pt", tmp_path / "linear.pt"
    text.write_text("not weights\n")
    torch.jit.script(torch.nn.Linear(3, 3)).save(str(linear))  # TorchScript, but no video network
    base = ["evaluate", "--real", str(videos), "--fake", str(videos), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    cases = [
        (["--metrics", "fvd", "--i3d-weights", str(none)], f"weights {none}: no such file"),
        (["--metrics", "fvd", "--i3d-weights", str(text)], f"weights {text}: not a readable PyTorch state dict"),
        (["--metrics", "fvd", "--i3d-weights", str(checkpoint)],
         f"weights {checkpoint}: not an InceptionI3d(400) state dict in the piergiaj layout (unexpected prior.net.weight; missing Conv3d_1a"),
        (["--metrics", "fvd", "--i3d-weights", str(linear)], f"weights {linear}: not StyleGAN-V's i3d_torchscript.pt ("),
        (["--metrics", "is", "--c3d-weights", str(none)], f"weights {none}: no such file"),
        (["--metrics", "is", "--c3d-weights", str(linear)], f"weights {linear}: not StyleGAN-V's c3d_ucf101.pt ("),
        (["--metrics", "is", "--c3d-weights", str(checkpoint)], f"weights {checkpoint}: not a C3D(101) state dict (unexpected prior.net.weight; missing "),
        (["--metrics", "clipsim", "--clip", str(none)], f"CLIP '{none}': no such folder"),
        (["--metrics", "clipsim", "--clip", str(text)], f"CLIP '{text}' cannot be loaded ("),
    ]
    for options, message in cases:
        assert main([*base, *options]) == 2, options
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1, (options, err)
    with pytest.raises(AssertionError, match="the flow started"):
        main([*base, "--metrics", "clipsim", "--clip", "tiny", "--i3d-weights", str(none), "--c3d-weights", str(text)])


def test_fvd_of_fewer_than_2_videos_a_side_is_refused_before_the_flow(no_flow, tmp_path, capsys):
    """FVD of 1 video a side (one prompt to sample, --num-videos 1, one real video) was refused only in
    the flow, after sampling: it is a one-line error (exit 2) before it, which counts the videos as the
    flow takes them; as is sampling without prompts."""
    from flows.cli import main

    three = _moving_stripes(tmp_path / "three", 30, step=1, frames=20, count=3)
    one = _moving_stripes(tmp_path / "one", 30, step=1, frames=20, count=1)
    one_prompt, two_prompts, ckpts = tmp_path / "one.txt", tmp_path / "two.txt", tmp_path / "ckpts"
    one_prompt.write_text("a cat\n")
    two_prompts.write_text("a cat\na dog\n")
    ckpts.mkdir()
    base = ["evaluate", "--metrics", "fvd", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    cases = [
        (["--real", str(three), "--checkpoints", str(ckpts), "--prompts", str(one_prompt)],
         f"fvd needs at least 2 fake videos, got 1 (1 prompt in {one_prompt})"),
        (["--real", str(three), "--checkpoints", str(ckpts), "--prompts", str(two_prompts), "--num-videos", "1"],
         f"fvd needs at least 2 fake videos, got 1 (2 prompts in {two_prompts}, --num-videos 1)"),
        (["--real", str(three), "--fake", str(three), "--num-videos", "1"],
         f"fvd needs at least 2 fake videos, got 1 (3 videos in {three}, --num-videos 1)"),
        (["--real", str(one), "--fake", str(three)], f"fvd needs at least 2 real videos, got 1 (1 video in {one})"),
        (["--fake", str(three), "--num-videos", "1", "--metrics", "is"],  # (was found as the score was computed)
         f"is needs at least 2 fake videos, got 1 (3 videos in {three}, --num-videos 1)"),
        (["--real", str(three), "--checkpoints", str(ckpts)],
         "sampling the fake videos (--checkpoints, --registry) needs --prompts FILE"),
    ]
    for options, message in cases:
        assert main([*base, *options]) == 2, options
        err = capsys.readouterr().err
        assert err == f"error: {message}\n", (options, err)
    with pytest.raises(AssertionError, match="the flow started"):  # 2 a side
        main([*base, "--real", str(three), "--fake", str(three), "--num-videos", "2"])
