"""The `mav` command as a user runs it: no Prefect server configured, so it starts its own."""
from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data_prep.ffmpeg_bin import ffmpeg_exe

REPO = Path(__file__).resolve().parent.parent


def user_env(prefect_home: Path) -> dict:
    """A user's environment: no Prefect server configured, so mav starts its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    return env | {"PREFECT_HOME": str(prefect_home), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}


def mav(*args: str, prefect_home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=user_env(prefect_home), cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_ingest_runs_its_flow_on_a_temporary_server(tmp_path, samples):
    video = tmp_path / "videos" / "short.mp4"
    video.parent.mkdir()
    subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(samples / "bottle-detection.mp4"), "-t", "3",
                    "-c", "copy", str(video)], check=True)
    home = tmp_path / "prefect-home"
    done = mav("ingest", str(video.parent), "--data-root", str(tmp_path / "root"), "--no-progress", prefect_home=home)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sources: 1 processed, 0 already done, 0 failed" in done.stdout + done.stderr
    assert "View at" not in done.stdout + done.stderr  # the temporary server has no UI to link to
    deadline = time.monotonic() + 20  # the server, sent SIGTERM as mav left, may still be recording states
    while True:
        with sqlite3.connect(home / "prefect.db") as db:  # the server's store: the flow and its task ran there
            flows = db.execute("select flow.name, flow_run.state_type from flow_run join flow "
                               "on flow.id = flow_run.flow_id").fetchall()
            tasks = db.execute("select state_type from task_run").fetchall()
        if tasks == [("COMPLETED",)] or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert flows == [("ingest", "COMPLETED")]
    assert tasks == [("COMPLETED",)]


def test_a_server_that_cannot_start_is_a_clear_error(tmp_path):
    home = tmp_path / "not-a-folder"
    home.write_text("PREFECT_HOME must be a folder")
    done = mav("ingest", str(tmp_path), "--data-root", str(tmp_path / "root"), "--no-progress", prefect_home=home)
    assert done.returncode == 2
    assert "error: the temporary Prefect server exited" in done.stderr
    assert "unable to open database file" in done.stderr.splitlines()[-1]  # the reason, not a traceback


def test_a_server_that_starts_too_slowly_is_a_clear_error():
    from flows.early_server import EarlyServer, ServerError

    server = EarlyServer()
    with pytest.raises(ServerError, match="did not start within 0 s: "):
        server.wait_ready(0.0)  # no time at all: the error still carries the server's reason
    assert server.process.wait(timeout=30) is not None  # and the server was stopped


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc to find child processes")
def test_the_server_dies_with_a_killed_mav(tmp_path, samples):
    env = user_env(tmp_path / "prefect-home")
    process = subprocess.Popen([sys.executable, "-m", "flows.cli", "ingest", str(samples), "--data-root",
                                str(tmp_path / "root"), "--no-progress"], env=env, cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (servers := _children(process.pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert servers, "mav started no server process"
    process.kill()  # SIGKILL: no finally, no atexit
    process.wait()
    deadline = time.monotonic() + 30
    while Path(f"/proc/{servers[0]}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{servers[0]}").exists(), "the temporary server outlived mav"


@pytest.mark.slow
def test_pipeline_exits_when_its_flow_is_done(tmp_path, video_dir):
    """The demo's path: `mav pipeline` on its own temporary server, through to a prompt exit.

    Prefect's log and event workers drain to the server at exit; with the server stopped
    before that (when it still stopped in main's `finally`), one demo run sat ~95 s
    after its flow had finished, while they retried. It is a race: other runs exited at once."""
    from test_pipeline import SAMPLES_ONLY, chain_steps, write_config

    config = write_config(tmp_path, video_dir, steps=chain_steps(*SAMPLES_ONLY))
    env = user_env(tmp_path / "prefect-home")
    process = subprocess.Popen([sys.executable, "-m", "flows.cli", "pipeline", "--config", str(config)], env=env,
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    said = []
    for line in process.stdout:  # up to the flow's last line
        said.append(line)
        if "MLflow UI: mlflow ui --backend-store-uri" in line:
            break
    try:  # a hang guard, not a timing: the bug kept mav alive for minutes
        rest, _ = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("mav kept running after its flow had finished")
    assert process.returncode == 0, rest
    said = "".join(said)
    assert f"--backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}" in said
    assert "tiny configs: tiny models trained from scratch on this machine" in said
    sample = re.search(r"sample video: (\S+\.mp4)", said)
    assert sample and Path(sample.group(1)).stat().st_size > 0


def test_train_command_trains_refuses_a_used_folder_and_resumes(tmp_path, capsys):
    """`mav train` in-process (it runs no flow, so no server): each error is one line and exit 2."""
    from data_prep.synthetic import write_synthetic_dataset
    from flows.cli import main
    from models.stages import read_checkpoint

    write_synthetic_dataset(tmp_path / "data", "shapes", num_clips=4, frames=12, size=32, fps=12)
    out = tmp_path / "prior"
    base = ["train", "prior", "--config", str(REPO / "configs" / "tiny" / "prior.yaml"), "--data-root",
            str(tmp_path / "data"), "--dataset", "shapes", "--out", str(out)]
    assert main([*base, "--max-steps", "2"]) == 0
    said = capsys.readouterr().out
    assert "prior: step 2" in said
    assert re.search(r", [\d.]+ samples/s, [\d.e+-]+ model TFLOP/s, waiting for data \d+ % of the time, ", said)
    assert main([*base, "--max-steps", "4"]) == 2  # would have hidden the first run's last.ckpt
    assert "last.ckpt is an earlier run's: pass --resume" in capsys.readouterr().err
    assert main([*base, "--max-steps", "4", "--set", "trainer.lr"]) == 2
    assert "a setting must be KEY=VALUE" in capsys.readouterr().err
    assert main([*base, "--max-steps", "4", "--resume"]) == 0
    assert read_checkpoint(out / "checkpoints" / "last.ckpt")["global_step"] == 4
    assert main([*base, "--max-steps", "3", "--resume"]) == 2  # trained 0 steps and said "loss nan"
    assert "last.ckpt is at step 4, and the run ends at step 3" in capsys.readouterr().err
    assert main([*base, "--max-steps", "6", "--set", "prior.width=64", "--set", "prior.heads=5"]) == 2
    assert "prior.heads: must divide prior.width = 64, got 5" in capsys.readouterr().err
    assert not list((out / "checkpoints").glob(".tmp-*"))  # written beside, renamed over: nothing left
    last = out / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # damaged outside the run
    assert main([*base, "--max-steps", "6", "--resume"]) == 2
    assert f"{last}: not a readable checkpoint (not a whole file written by torch.save" in capsys.readouterr().err
    config = REPO / "configs" / "tiny" / "prior.yaml"  # a YAML file for --init: no word of torch's mmap
    assert main([*base[:-1], str(tmp_path / "other"), "--init", str(config)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {config}: not a readable checkpoint (not a whole file written " \
                                              "by torch.save: cut short, or another kind of file)"
    assert main([*base[:-1], str(tmp_path / "other"), "--set", f"clip={tmp_path / 'no-clip'}"]) == 2
    assert capsys.readouterr().err.strip() == f"error: CLIP '{tmp_path / 'no-clip'}': no such folder"
    (tmp_path / "a-file").write_text("x")  # failed inside fit, with a trace, after the model was built
    assert main([*base[:-1], str(tmp_path / "a-file")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --out {tmp_path / 'a-file'}: is a file, not a folder"


def test_data_that_fails_in_a_loader_worker_is_one_line(tmp_path, capsys):
    """A DataError raised in a DataLoader worker arrived wrapped in the worker's traceback."""
    from flows.cli import main

    for i in range(12):
        (tmp_path / f"{i}.jpg").write_bytes(b"not a jpeg")
        (tmp_path / f"{i}.txt").write_text(f"caption {i}")
    assert main(["train", "prior", "--config", str(REPO / "configs" / "tiny" / "prior.yaml"), "--set",
                 "data.source=images", "--set", f"data.image_path={tmp_path}", "--set", "data.num_workers=1",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert re.fullmatch(rf"error: 11 of 11 samples did not decode, the last {tmp_path}/\d+\.jpg: cannot identify "
                        rf"image file '{tmp_path}/\d+\.jpg'", err[-1]), err[-1]
    # (not "no Traceback": a logging handler an earlier test left on its closed capture prints one)
    assert not [line for line in err if "DataLoader worker" in line], "\n".join(err)


def test_a_checkpoint_that_fails_to_save_leaves_the_previous_one_whole(tmp_path):
    from models.train import AtomicCheckpointIO

    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1, "w": torch.ones(1000)}, path)
    with pytest.raises(Exception, match="pickle|lambda"):
        AtomicCheckpointIO().save_checkpoint({"global_step": 2, "w": torch.zeros(1000), "bad": lambda: 0}, path)
    assert torch.load(path)["global_step"] == 1 and torch.load(path)["w"].sum() == 1000
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_bad_ingest_and_pipeline_input_is_one_line_and_exit_2(prefect_server, tmp_path, samples, capsys):
    """Checked before any flow starts: no Prefect trace, one line naming the input."""
    import re

    from flows.cli import main

    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "broken.yaml").write_text("clips: [\n")
    (tmp_path / "latin.yaml").write_bytes(b"clips: \xff\n")  # (its error named no file)
    (tmp_path / "a-file").write_text("")
    (tmp_path / "pipeline.yaml").write_text("steps:\n  - {name: p, stage: prior, config: configs/tiny/prior.yaml, "
                                             "overrides: {trainer.lrr: 1}}\n")
    cases = [
        (["--config", str(tmp_path / "nope.yaml")], r"ingest config \S*nope.yaml: no such file"),
        (["--workers", "2", "--config", str(tmp_path / "nope.yaml")], r"ingest config \S*nope.yaml: no such file"),
        (["--config", str(tmp_path / "list.yaml")], "list.yaml: expected a mapping of settings, got list"),
        (["--config", str(tmp_path / "broken.yaml")], "broken.yaml: not valid YAML"),
        (["--config", str(tmp_path / "latin.yaml")], r"latin.yaml: not UTF-8 text \(byte 7: invalid start byte\)"),
        (["--dataset", "a/b"], "dataset name 'a/b'"),
        (["--dataset", "bob's clips"], "dataset name \"bob's clips\": use letters, digits"),  # broke MLflow filters
        (["--data-root", str(tmp_path / "a-file" / "root")], r"--data-root \S+: cannot be created \(Not a directory\)"),
        (["--data-root", ""], r"--data-root is empty \(an unset shell variable\?\)"),  # it wrote into the cwd
    ]
    for options, message in cases:
        assert main(["ingest", str(samples), "--no-progress", *options]) == 2, options
        err = capsys.readouterr().err.strip()
        assert re.search(message, err) and len(err.splitlines()) == 1, err
    assert main(["ingest", ""]) == 2 and "an empty source" in capsys.readouterr().err
    assert main(["pipeline", "--config", str(tmp_path / "pipeline.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(r"step p: \S+prior.yaml: trainer.lrr: unknown key", err) and len(err.splitlines()) == 1, err
    assert not (tmp_path / "mav-data").exists()
    # where it reads and writes: before the ingest ran (a trace after it), or the old version was
    # trained on with the missing sources only logged
    (tmp_path / "no-videos").mkdir()
    (tmp_path / "no-videos" / "notes.txt").write_text("x")
    places = [(f"sources: [{tmp_path / 'nosuch'}]\n", r"sources: no such file or folder: \S+nosuch"),
              ("sources: []\n", r"sources: none given"),
              (f"sources: [{tmp_path / 'no-videos'}]\n", r"sources: no video files in \S+no-videos \(by extension"),
              (f"sources: [{samples}]\ndata_root: {tmp_path / 'd'}\nwork_dir: {tmp_path / 'a-file' / 'runs'}\n",
               r"work_dir \S+runs: cannot be created \(Not a directory\)"),
              (f"sources: [{samples}]\ndata_root: {tmp_path / 'a-file' / 'data'}\nwork_dir: {tmp_path / 'w'}\n",
               r"data_root \S+data: cannot be created \(Not a directory\)"),
              (f"sources: [{samples}]\nsteps:\n  - {{name: sr, stage: sr_high, config: configs/tiny/sr_high.yaml, "
               f"overrides: {{data.source: images, data.image_path: {tmp_path / 'pairs'}}}}}\n",
               r"step sr: data.image_path \S+pairs: no such file or folder"),
              (f"sources: [{samples}]\nevaluate: {{i3d_weights: {tmp_path / 'i3d.pt'}}}\n",
               r"evaluate.i3d_weights \S+i3d.pt: no such file")]
    for text, message in places:
        (tmp_path / "pipeline.yaml").write_text(text)
        assert main(["pipeline", "--config", str(tmp_path / "pipeline.yaml")]) == 2, text
        err = capsys.readouterr().err.strip()
        assert re.search(message, err) and len(err.splitlines()) == 1, err
    # a version that is not there, and --force without one: before the flow (which logs a trace)
    import yaml

    chain = yaml.safe_load((REPO / "configs" / "tiny" / "pipeline.yaml").read_text())["steps"]  # a chain that samples
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({"sources": [str(samples)], "data_root": str(tmp_path / "d"),
                                                            "steps": chain}))
    for options, message in ((["--version", "deadbeef"], "dataset 'samples' has no version 'deadbeef'"),
                             (["--force"], r"--force goes with --version V"),
                             # retried for minutes inside the flow, after the ingest
                             (["--tracking-uri", "http://127.0.0.1:1"],
                              r"^error: tracking URI http://127.0.0.1:1: no MLflow server answers \(ConnectionError\)$"),
                             (["--tracking-uri", "foo://bar"], r"tracking URI foo://bar: not a store MLflow opens")):
        assert main(["pipeline", "--config", str(tmp_path / "pipeline.yaml"), *options]) == 2
        err = capsys.readouterr().err.strip()
        assert re.search(message, err) and len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_the_base_pipeline_is_the_demo_chain_on_base_stages(tmp_path, capsys, monkeypatch):
    """configs/base/pipeline.yaml loads, runs the demo's chain of steps on the base stage configs
    (the prior and sr_high on image-text pairs), ingests what its video stages read, and stops in
    one line, before any work, where its placeholders are not filled in."""
    from data_prep.config import load_ingest_config
    from flows.cli import main
    from flows.pipeline_config import load_pipeline_config
    from models.config import load_config

    base, tiny = (load_pipeline_config(REPO / "configs" / size / "pipeline.yaml") for size in ("base", "tiny"))
    assert [(s.name, s.stage, s.init_from) for s in base.steps] == [(s.name, s.stage, s.init_from) for s in tiny.steps]
    ingest = load_ingest_config(str(REPO / base.ingest_config))
    for step in base.steps:
        assert Path(step.config).parts[:2] == ("configs", "base")
        cfg = load_config(REPO / step.config, step.overrides)
        if cfg.data.source == "images":
            assert step.name in ("prior", "sr_high")
        else:
            assert ingest.clips.short_side >= cfg.data.size, step.name
    monkeypatch.chdir(tmp_path)
    assert main(["pipeline", "--config", str(REPO / "configs" / "base" / "pipeline.yaml")]) == 2
    assert re.fullmatch(r"error: sources: no such file or folder: \S*videos", capsys.readouterr().err.strip())
    (tmp_path / "videos").mkdir()
    assert main(["pipeline", "--config", str(REPO / "configs" / "base" / "pipeline.yaml")]) == 2
    assert re.fullmatch(r"error: sources: no video files in \S*videos \(by extension: the ingest config's "
                        r"video_extensions\)", capsys.readouterr().err.strip())
    (tmp_path / "videos" / "a.mp4").write_bytes(b"")  # (the check reads names, not bytes)
    assert main(["pipeline", "--config", str(REPO / "configs" / "base" / "pipeline.yaml")]) == 2
    assert capsys.readouterr().err.strip() == "error: step prior: data.image_path image-text: no such file or folder"


def test_pipeline_runs_are_told_apart_by_their_stage_configs_and_code(tmp_path):
    """`--version V` and a repeated event skip a version with a finished run of the same digest:
    a stage config edited in its own file changes it too, as it changes the step's cache key
    (which retrains that step), as do the dataset version, the init step and the code."""
    from flows.pipeline import pipeline_digest, step_key
    from flows.pipeline_config import load_pipeline_config

    stage = tmp_path / "prior.yaml"
    stage.write_text((REPO / "configs" / "tiny" / "prior.yaml").read_text())
    config = tmp_path / "pipeline.yaml"
    config.write_text(f"steps:\n  - {{name: p, stage: prior, config: {stage}}}\n")
    cfg = load_pipeline_config(config)
    before, key = pipeline_digest(cfg, "code"), step_key(cfg.steps[0], "v1", None, "code", "here")
    stage.write_text(stage.read_text() + "cond_dropout: 0.2\n")
    assert pipeline_digest(cfg, "code") != before != pipeline_digest(cfg, "other code")
    keys = {key, step_key(cfg.steps[0], "v1", None, "code", "here"), step_key(cfg.steps[0], "v2", None, "code", "here"),
            step_key(cfg.steps[0], "v1", "init", "code", "here"), step_key(cfg.steps[0], "v1", None, "other", "here")}
    assert len(keys) == 5


def test_image_text_pairs_added_to_a_steps_folder_retrain_it(tmp_path):
    """A step on image-text pairs (data.image_path) reads what is in the folder when it trains: pairs
    added or replaced there were a cache hit (same config, dataset version, code), the step not retrained;
    a new version of the video dataset retrained it."""
    from flows.pipeline import pipeline_digest, step_key
    from flows.pipeline_config import load_pipeline_config

    pairs = tmp_path / "pairs"
    pairs.mkdir()
    (pairs / "a.jpg").write_bytes(b"jpeg")
    (pairs / "a.txt").write_text("a cat")
    config = tmp_path / "pipeline.yaml"
    config.write_text("steps:\n  - {name: prior, stage: prior, config: configs/tiny/prior.yaml, "
                      f"overrides: {{data.source: images, data.image_path: {pairs}}}}}\n")
    cfg = load_pipeline_config(config)

    def keys():
        return step_key(cfg.steps[0], "v1", None, "code", "here"), pipeline_digest(cfg, "code")

    before = keys()
    assert keys() == before
    (pairs / "b.jpg").write_bytes(b"jpeg")
    (pairs / "b.txt").write_text("a dog")
    added = keys()
    assert added[0] != before[0] and added[1] != before[1]
    (pairs / "b.txt").write_text("a small dog")  # a caption edited
    assert keys()[0] != added[0]
    # and only them: a new version of the video dataset, which the step never reads, retrained it
    assert step_key(cfg.steps[0], "v2", None, "code", "here") == keys()[0]
    video_step = cfg.steps[0].model_copy(update={"overrides": {}})
    assert step_key(video_step, "v2", None, "code", "here") != step_key(video_step, "v1", None, "code", "here")


def test_a_deleted_mlflow_experiment_is_named_with_the_way_back(tmp_path):
    from mlflow import MlflowClient

    from flows.tracking import experiment_id

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    MlflowClient(uri).delete_experiment(experiment_id(uri, "mav-pipeline"))
    with pytest.raises(ValueError, match="experiment 'mav-pipeline' .* is deleted: restore it "
                                         r"\(mlflow experiments restore --experiment-id \d+\)"):
        experiment_id(uri, "mav-pipeline")


def test_pipeline_metrics_are_named_like_evaluates(tmp_path):
    from flows.pipeline_config import load_pipeline_config

    config = tmp_path / "pipeline.yaml"
    config.write_text("evaluate: {metrics: [' FVD', clipsim]}\n")
    assert load_pipeline_config(config).evaluate.metrics == ["fvd", "clipsim"]
    for text in ("sample: {prompts: [one]}\n", "evaluate: {num_videos: 1}\n"):  # found after training, before
        config.write_text(text)
        with pytest.raises(ValueError, match="FVD needs at least 2 sampled videos"):
            load_pipeline_config(config)
    config.write_text("sample: {prompts: [one]}\nevaluate: {metrics: [clipsim]}\n")
    assert load_pipeline_config(config).sample.prompts == ["one"]
    config.write_text("evaluate: {metrics: [fvd, foo]}\n")
    with pytest.raises(ValueError, match=r"pipeline config \S+: evaluate.metrics: unknown metrics \['foo'\]"):
        load_pipeline_config(config)


def test_an_init_step_whose_weights_cannot_start_the_step_is_named_before_anything_runs(tmp_path):
    """init_from an earlier step of a stage that cannot start this one, or trained for other network
    settings or another CLIP: the step failed when it started, after the ingest and every earlier step."""
    from flows.pipeline_config import load_pipeline_config

    tiny = REPO / "configs" / "tiny"
    decoder_image = f"{{name: decoder_image, stage: decoder, config: {tiny / 'decoder.yaml'}, overrides: {{mode: image}}}}"
    cases = {
        f"{{name: prior, stage: prior, config: {tiny / 'prior.yaml'}}}\n"
        f"  - {{name: sr_high, stage: sr_high, config: {tiny / 'sr_high.yaml'}, init_from: prior}}":
            r"step sr_high: init_from 'prior': a 'prior' step; stage 'sr_high' can start from \['sr_high', 'sr_low'\] steps",
        f"{decoder_image}\n  - {{name: decoder, stage: decoder, config: {tiny / 'decoder.yaml'}, "
        "init_from: decoder_image, overrides: {diffusion.prediction: epsilon}}":
            r"step decoder: init_from 'decoder_image': trained for other settings \(diffusion.prediction: "
            r"decoder_image 'v', decoder 'epsilon'\)",
        f"{decoder_image}\n  - {{name: interpolation, stage: interpolation, config: {tiny / 'interpolation.yaml'}, "
        f"init_from: decoder_image, overrides: {{clip: {tmp_path}}}}}":
            r"step interpolation: init_from 'decoder_image': trained for other settings \(clip: decoder_image 'tiny'",
    }
    config = tmp_path / "pipeline.yaml"
    for steps, message in cases.items():
        config.write_text(f"steps:\n  - {steps}\n")
        with pytest.raises(ValueError, match=message):
            load_pipeline_config(config)
    config.write_text(f"steps:\n  - {decoder_image}\n  - {{name: interpolation, stage: interpolation, "
                      f"config: {tiny / 'interpolation.yaml'}, init_from: decoder_image}}\n")
    assert load_pipeline_config(config).steps[1].init_from == "decoder_image"  # a decoder starts an interpolation


def test_a_step_name_that_mlflow_refuses_is_named_when_the_config_loads(tmp_path):
    """A step's name names its registered model (no / or :) and its MLflow metric and tag (letters,
    digits, _ - . and spaces): others failed the step at its registration, after it had trained."""
    from flows.pipeline_config import load_pipeline_config

    config = tmp_path / "pipeline.yaml"
    for name in ("decoder/video", "sr:low", "prior@2", "..", "a,b"):
        config.write_text(f"steps:\n  - {{name: '{name}', stage: prior, config: configs/tiny/prior.yaml}}\n")
        with pytest.raises(ValueError, match=rf"step {re.escape(name)}: a step name holds letters, digits"):
            load_pipeline_config(config)
    config.write_text("steps:\n  - {name: prior v2.1-b, stage: prior, config: configs/tiny/prior.yaml}\n")
    assert load_pipeline_config(config).steps[0].name == "prior v2.1-b"


def test_registry_names_and_a_video_step_from_scratch_are_named_when_the_config_loads(tmp_path):
    """Each failed after training: the alias at the run's very end, a model prefix MLflow refuses at the
    first registration, a frozen video step without init_from when it started; and steps sr-low and
    sr_low shared one registered model (the champion could be either)."""
    from flows.pipeline_config import load_pipeline_config

    tiny = REPO / "configs" / "tiny"
    prior = f"{{name: prior, stage: prior, config: {tiny / 'prior.yaml'}}}"
    config = tmp_path / "pipeline.yaml"
    cases = [
        (f"steps: [{prior}]\nregistry: {{alias: champ ion}}\n", r"registry.alias 'champ ion': letters, digits"),
        (f"steps: [{prior}]\nregistry: {{alias: v2}}\n", r"registry.alias 'v2': .*not latest, v1, V2"),
        (f"steps: [{prior}]\nregistry: {{model_prefix: team/mav}}\n", r"registry.model_prefix 'team/mav': not empty"),
        (f"steps: [{prior}, {prior.replace('name: prior', 'name: prior_2')}, "
         f"{prior.replace('name: prior', 'name: prior-2')}]\n",
         r"steps prior_2 and prior-2 are both registered as mav-prior-2; rename one"),
        (f"steps: [{{name: decoder, stage: decoder, config: {tiny / 'decoder.yaml'}}}]\n",
         r"step decoder: freeze_spatial: a video-mode decoder trained from scratch with its spatial layers frozen"),
    ]
    for text, message in cases:
        config.write_text(text)
        with pytest.raises(ValueError, match=rf"pipeline config \S+: {message}"):
            load_pipeline_config(config)
    config.write_text(f"steps: [{prior}]\nregistry: {{alias: best-2026_11, model_prefix: team.mav}}\n")
    assert load_pipeline_config(config).registry.alias == "best-2026_11"


def test_a_pipeline_without_prompts_is_named_when_the_config_loads(tmp_path):
    """No prompt, no sample: with CLIPSIM alone the run trained every step, then failed after it."""
    from flows.pipeline_config import load_pipeline_config

    config = tmp_path / "pipeline.yaml"
    config.write_text("sample: {prompts: []}\nevaluate: {metrics: [clipsim]}\n")
    with pytest.raises(ValueError, match=r"pipeline config \S+: sample.prompts: List should have at least 1 item"):
        load_pipeline_config(config)


def test_a_chain_that_cannot_sample_is_named_before_anything_runs(tmp_path):
    """The pipeline samples from the last step of each stage: without a prior or a decoder step, with an
    image-mode last decoder, or with stages of different CLIPs, it failed at sampling, after all the training."""
    import warnings

    from flows.pipeline import check_places
    from flows.pipeline_config import load_pipeline_config
    from models.clip import tiny_clip_path

    tiny = REPO / "configs" / "tiny"
    prior = f"{{name: prior, stage: prior, config: {tiny / 'prior.yaml'}}}"
    image = f"{{name: decoder_image, stage: decoder, config: {tiny / 'decoder.yaml'}, overrides: {{mode: image}}}}"
    video = f"{{name: decoder, stage: decoder, config: {tiny / 'decoder.yaml'}, init_from: decoder_image}}"
    other_clip = str(tiny_clip_path())  # the same weights under another name: load_chain's rule compares names
    cases = {
        (image, video): r"^steps: the pipeline samples from a prior and a decoder step; there is no prior step",
        (prior,): r"^steps: the pipeline samples from a prior and a decoder step; there is no decoder step",
        (prior, image): r"^step decoder_image: the last decoder step, which samples, is image-mode",
        (prior.replace("}", f", overrides: {{clip: {other_clip}}}}}"), image, video):
            r"^steps prior, decoder: trained with different CLIP models \(prior '\S+tiny-clip', decoder 'tiny'\)",
    }
    config = tmp_path / "pipeline.yaml"
    places = f"data_root: {tmp_path / 'data'}\nwork_dir: {tmp_path / 'work'}\nevaluate: {{clip_model: tiny}}\n"
    for steps, message in cases.items():
        config.write_text(places + "steps:\n" + "".join(f"  - {step}\n" for step in steps))
        cfg = load_pipeline_config(config)
        with pytest.raises(ValueError, match=message):
            check_places(cfg, None, ingests=False)
        check_places(cfg, None, ingests=False, evaluates=False)  # the train flow samples nothing
    config.write_text(places + "steps:\n" + "".join(f"  - {step}\n" for step in (prior, image, video)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_places(load_pipeline_config(config), None, ingests=False)
    # `mav sample --registry champion` finds each stage's model by the stage's name
    config.write_text(places + "steps:\n" + "".join(f"  - {step}\n" for step in (
        prior, image, video.replace("name: decoder,", "name: decoder_video,"))))
    with pytest.warns(UserWarning, match="step decoder_video: the last decoder step is registered as mav-decoder-video, "
                                         "and `mav sample --registry` looks for mav-decoder"):
        check_places(load_pipeline_config(config), None, ingests=False)


def test_bad_evaluate_input_is_one_line_and_exit_2(prefect_server, tmp_path, capsys):
    import json
    import re

    import numpy as np

    from flows.cli import main
    from models.video_io import write_mp4

    fake, short = tmp_path / "fake", tmp_path / "short"
    write_mp4(np.zeros((4, 16, 16, 3), dtype=np.uint8), fake / "a.mp4", fps=4)
    for name in ("a.mp4", "b.mp4"):  # two: IS needs 2 videos
        write_mp4(np.zeros((4, 16, 16, 3), dtype=np.uint8), short / name, fps=4)
    (tmp_path / "bad.json").write_text("{not json")
    mixed = tmp_path / "mixed"  # two `mav sample` runs into one folder, the second with --steps 2
    records = {}
    for i, steps in enumerate((None, 2)):
        write_mp4(np.zeros((16, 16, 16, 3), dtype=np.uint8), mixed / f"sample-000{i}.mp4", fps=4)
        settings = {"checkpoints": {}, "steps": steps, "guidance": None, "lowres_noise": None}
        records[f"sample-000{i}.mp4"] = {"prompt": "x", "seed": i, "sampled_with": settings}
    (mixed / "samples.json").write_text(json.dumps(records))
    (tmp_path / "weights.pt").write_text("not weights")
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    chain, prompts = tmp_path / "chain", tmp_path / "prompts.txt"
    chain.mkdir()
    (chain / "decoder.ckpt").write_bytes(b"")  # a decoder and no prior
    prompts.write_text("a cat\n")
    cases = [
        (["--fake", str(tmp_path / "nowhere")], r"nowhere: not a folder, an MLflow run"),
        (["--fake", str(fake), "--metrics", "fvd,foo"], r"unknown metrics \['foo'\]"),
        (["--fake", str(fake), "--prompts", str(tmp_path / "bad.json")], r"prompts \S+bad.json: not readable"),
        (["--fake", str(fake), "--prompts", str(tmp_path / "nope.txt")], r"prompts \S+nope.txt: no such file"),
        (["--fake", "runs:/deadbeefdeadbeef", "--tracking-uri", uri], "runs:/deadbeefdeadbeef: not found in the MLflow"),
        (["--fake", str(fake), "--metrics", "fvd,clipsim"], r"clipsim needs the prompts of the fake videos: pass --prompts FILE \(none found"),
        (["--real", str(fake)], r"give --fake SRC, or --checkpoints DIR"),
        (["--protocol", "msrvtt", "--captions", str(prompts)],  # (found in the flow, behind its trace)
         r"the msrvtt protocol scores fake videos: give --fake SRC, or --checkpoints DIR or --registry ALIAS"),
        (["--real", str(fake), "--fake", str(fake), "--checkpoints", str(tmp_path)],  # (they were ignored)
         r"give one of --fake, --checkpoints and --registry"),
        (["--fake", str(fake)], r"fvd needs --real SRC"),
        (["--real", str(fake), "--fake", str(fake), "--clip-length", "8"], r"--clip-length 8 is below 9, the shortest"),
        (["--fake", str(fake), "--metrics", "is", "--clip-length", "9"], r"--clip-length 9: the inception score's C3D"),
        (["--real", str(fake), "--fake", str(mixed)],  # before any decoding
         rf"{mixed}: its videos come from 2 sampling runs with different steps \(sample-0000.mp4 and sample-0001.mp4;"),
        (["--fake", str(short), "--metrics", "is"],  # before any decoding, not while scoring
         r"\S+a.mp4: 4 frames, shorter than one clip \(--clip-length 16, --clip-stride 1: 16 frames\)"),
        (["--real", str(fake), "--fake", str(fake)], r"fvd needs at least 2 fake videos, got 1 \(1 video in \S+fake\)"),
        (["--checkpoints", str(chain), "--prompts", str(prompts), "--metrics", "clipsim"],  # (found in the flow)
         rf"{chain}: no prior checkpoint \(as <stage>.ckpt or <stage>/checkpoints/last.ckpt\)"),
    ]
    for options, message in cases:
        assert main(["evaluate", "--metrics", "fvd", *options]) == 2, options
        err = capsys.readouterr().err.strip()  # (MLflow logs a line when it first opens a store)
        assert re.search(message, err.splitlines()[-1]) and "Traceback" not in err and "Flow run" not in err, err
    # weights that are not any: found before the flow too (they were inside it, behind Prefect's trace)
    longer = tmp_path / "longer"
    for name in ("a.mp4", "b.mp4"):
        write_mp4(np.zeros((16, 16, 16, 3), dtype=np.uint8), longer / name, fps=4)
    assert main(["evaluate", "--real", str(longer), "--fake", str(longer), "--metrics", "fvd", "--i3d-weights",
                 str(tmp_path / "weights.pt"), "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1] == f"error: weights {tmp_path / 'weights.pt'}: not a readable PyTorch state dict"
    assert "Traceback" not in err and "Flow run" not in err, err


def test_sample_says_which_checkpoints_are_missing_and_where_it_looked(tmp_path, capsys):
    from flows.cli import main

    assert main(["sample", "--prompt", "x", "--checkpoints", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --checkpoints {tmp_path / 'nope'}: no such folder"
    (tmp_path / "prior.ckpt").write_bytes(b"")
    assert main(["sample", "--prompt", "x", "--checkpoints", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: no decoder checkpoint in {tmp_path} (as <stage>.ckpt or "
                                               "<stage>/checkpoints/last.ckpt); or name it with --decoder")


def test_sample_checks_where_it_writes_before_sampling(tmp_path, capsys):
    """Each refused before any checkpoint is read (empty placeholder files here)."""
    from flows.cli import main

    for stage in ("prior", "decoder"):
        (tmp_path / f"{stage}.ckpt").write_bytes(b"")
    (tmp_path / "folder.mp4").mkdir()
    (tmp_path / "afile").write_text("x")
    base = ["sample", "--checkpoints", str(tmp_path), "--prompt", "x"]
    cases = [
        (["--out", str(tmp_path / "folder.mp4")], "is a folder; name an .mp4 file"),
        (["--out", str(tmp_path / "v.webm")], "name an .mp4 file (its .gif preview is written beside it)"),
        (["--out", str(tmp_path / "afile" / "v.mp4")], f"{tmp_path / 'afile'} is a file, not a folder"),
        (["--prompt", "y", "--out", str(tmp_path / "afile")], f"the folder {tmp_path / 'afile'}, which is a file"),
        (["--prompt", "y", "--out", "."], "name an .mp4 file, or for several prompts a folder for their videos"),
    ]
    for options, message in cases:
        assert main([*base, *options]) == 2, options
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --out ") and err.endswith(message), err
    for option, value, message in [("--guidance", "nan", "must be a finite number >= 0, got nan"),
                                   # failed after the checkpoints were read
                                   ("--device", "meta", "'meta': this machine has no such device"),
                                   ("--device", "xpu", "'xpu': this machine has no such device"),
                                   ("--seed", str(2**64), f"must be below {2**63}, got {2**64}"),  # torch overflowed
                                   ("--seed", "-1", "must be at least 0, got -1")]:  # wrapped to 2**64 - 1
        with pytest.raises(SystemExit) as exit_:
            main([*base, option, value])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and f"argument {option}: {message}" in err, err
