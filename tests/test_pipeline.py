"""The end-to-end pipeline against a real Prefect server and a real MLflow (SQLite) store."""
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from flows.pipeline import pipeline, train
from flows.registry import registered_name

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny"
FAST = {"trainer.max_steps": 4, "trainer.warmup_steps": 1, "trainer.checkpoint_every": 2, "trainer.log_every": 1}


STEPS = [  # the whole chain
    {"name": "prior", "stage": "prior", "config": str(TINY / "prior.yaml"), "overrides": FAST},
    {"name": "decoder_image", "stage": "decoder", "config": str(TINY / "decoder.yaml"),
     "overrides": {**FAST, "mode": "image"}},
    {"name": "decoder", "stage": "decoder", "config": str(TINY / "decoder.yaml"), "overrides": FAST,
     "init_from": "decoder_image"},
    {"name": "interpolation", "stage": "interpolation", "config": str(TINY / "interpolation.yaml"),
     "overrides": FAST, "init_from": "decoder"},
    {"name": "sr_low", "stage": "sr_low", "config": str(TINY / "sr_low.yaml"), "overrides": {**FAST, "mode": "image"}},
    {"name": "sr_high", "stage": "sr_high", "config": str(TINY / "sr_high.yaml"), "overrides": FAST},
]
# the shortest chain that samples: a test of what happens around the stages trains only these
SAMPLES_ONLY = ("prior", "decoder_image", "decoder")


def chain_steps(*names: str) -> list[dict]:
    return [step for step in STEPS if step["name"] in names]


def write_config(tmp_path: Path, videos: Path, **changes) -> Path:
    config = {
        "sources": [str(videos)], "data_root": str(tmp_path / "data"), "dataset": "clips",
        "ingest_config": str(TINY / "ingest.yaml"), "work_dir": str(tmp_path / "work"),
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "mav-test", "steps": STEPS,
        "sample": {"prompts": ["a bunny in a meadow", "a person signing"], "steps": 2, "seed": 0},
        "evaluate": {"metrics": ["fvd", "clipsim"], "num_videos": 4, "clip_length": 9, "clip_model": "tiny",
                     "num_resamples": 20},
    }
    for key, value in changes.items():
        config[key] = value
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def runs_of(client: MlflowClient, experiment: str, filter_string: str = ""):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string=filter_string, max_results=500)


@pytest.mark.slow
def test_pipeline_end_to_end_then_cached_rerun(prefect_server, tmp_path, video_dir, capsys):
    config = write_config(tmp_path, video_dir)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = pipeline(config=str(config))
    client = MlflowClient(uri)
    parent = client.get_run(first["run_id"])
    assert parent.info.status == "FINISHED"
    assert {"smoke_fvd", "smoke_clipsim", "smoke_fvd_low", "smoke_fvd_high"} <= set(parent.data.metrics)
    assert parent.inputs.dataset_inputs[0].dataset.digest == first["version"]
    # what its FVD and CLIPSIM depend on, to compare parents by
    assert {k: parent.data.params[k] for k in ("sample.steps", "sample.seed", "evaluate.clip_length",
                                               "evaluate.num_videos")} == {"sample.steps": "2", "sample.seed": "0",
                                                                           "evaluate.clip_length": "9",
                                                                           "evaluate.num_videos": "4"}
    children = runs_of(client, "mav-test", f"tags.`mlflow.parentRunId` = '{first['run_id']}'")
    names = sorted(r.info.run_name for r in children)
    assert names == sorted(["prior", "decoder_image", "decoder", "interpolation", "sr_low", "sr_high", "evaluate"])
    decoder_run = next(r for r in children if r.info.run_name == "decoder")
    assert decoder_run.data.params["config.freeze_spatial"] == "True"
    assert len(client.get_metric_history(decoder_run.info.run_id, "train/loss")) == 4  # every step
    rates = [m.value for m in client.get_metric_history(decoder_run.info.run_id, "train/lr")]
    assert rates == pytest.approx([float(decoder_run.data.params["config.trainer.lr"])] * 4)  # warmup_steps 1: no ramp
    assert len(client.get_metric_history(decoder_run.info.run_id, "train/tflops")) == 3  # each step after the first
    for run in children:  # each stage's speed over its run, and in the parent for comparing pipeline runs
        if run.info.run_name != "evaluate":
            assert run.data.metrics["samples_per_s"] > 0 and 0 <= run.data.metrics["data_wait"] < 1, run.info.run_name
            assert run.data.metrics["tflops"] > 0 and "mfu" not in run.data.metrics, run.info.run_name  # (a CPU)
            assert parent.data.metrics[f"{run.info.run_name}_samples_per_s"] == run.data.metrics["samples_per_s"]
    assert parent.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    artifacts = {a.path for a in client.list_artifacts(first["run_id"], "samples")}
    assert {"samples/sample-0000.mp4", "samples/sample-0000.gif", "samples/prompts.json",
            "samples/samples.json"} <= artifacts
    assert [item["seed"] for item in first["samples"]] == [0, 1]  # the config's sample.seed + i
    # the run's samples are an evaluate source, with their prompts
    from flows.eval_sources import resolve_source

    samples = resolve_source(f"runs:/{first['run_id']}", tracking_uri=uri)
    assert [p.name for p in samples.paths] == ["sample-0000.mp4", "sample-0001.mp4"]
    assert samples.prompts == ["a bunny in a meadow", "a person signing"]
    # every step registered, the champion alias on this run's versions (there was none before)
    for step in ("prior", "decoder", "sr_high"):
        champion = client.get_model_version_by_alias(registered_name(step), "champion")
        assert champion.run_id in {r.info.run_id for r in children}
        assert champion.tags["mav.smoke_fvd_settings"] == ("real clips, N 4+2, 9 frames at native fps, stride 1, "
                                                           "biased, detector random")

    # the chain of this run, where `mav sample --checkpoints` looks: each stage's last step
    from flows.train import find_checkpoints

    chain = find_checkpoints(tmp_path / "work" / "checkpoints", {})
    assert {stage: path.resolve() for stage, path in chain.items()} == {  # the step named as its stage is the last
        stage: Path(first["checkpoints"][stage]).resolve() for stage in ("prior", "decoder", "interpolation",
                                                                         "sr_low", "sr_high")}

    # the registry gives the chain back: `mav sample --registry champion` samples what the links do,
    # from the checkpoint files whose sha256 each version recorded
    import hashlib

    from flows.cli import main
    from models.video_io import read_frames

    for stage, path in chain.items():
        version = client.get_model_version_by_alias(registered_name(stage), "champion")
        assert version.tags["mav.sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    common = ["--prompt", "a bunny in a meadow", "--steps", "1", "--seed", "3"]
    assert main(["sample", "--registry", "champion", "--tracking-uri", uri, *common,
                 "--out", str(tmp_path / "registry.mp4")]) == 0
    assert main(["sample", "--checkpoints", str(tmp_path / "work" / "checkpoints"), *common,
                 "--out", str(tmp_path / "links.mp4")]) == 0
    assert np.array_equal(read_frames(tmp_path / "registry.mp4")[0], read_frames(tmp_path / "links.mp4")[0])
    said = capsys.readouterr().out
    assert f"from the registry ({uri}): prior=mav-prior/1, decoder=mav-decoder/1, interpolation=mav-interpolation/1, " \
           "sr_low=mav-sr-low/1, sr_high=mav-sr-high/1" in said
    (tmp_path / "prompt.txt").write_text("a bunny in a meadow\n")
    assert main(["evaluate", "--registry", "champion", "--tracking-uri", uri, "--prompts", str(tmp_path / "prompt.txt"),
                 "--metrics", "clipsim", "--clip", "tiny", "--sample-steps", "1", "--bootstrap", "0"]) == 0
    evaluated = capsys.readouterr().err.split("mlflow run: ")[1].split()[0]
    params = client.get_run(evaluated).data.params
    assert params["registry_alias"] == "champion" and params["fake_kind"] == "sampled"
    assert params["model_versions"] == "prior=mav-prior/1, decoder=mav-decoder/1, interpolation=mav-interpolation/1, " \
                                       "sr_low=mav-sr-low/1, sr_high=mav-sr-high/1"

    # an event for the version just trained: nothing new since, so nothing to do
    again = pipeline(config=str(config), version=first["version"], new_clips=1)
    assert again == {"skipped": "below threshold", "new_clips": 1, "since_trained": 0}
    repeated = pipeline(config=str(config), version=first["version"])  # `mav pipeline --version V` again
    assert repeated == {"skipped": "already done", "run_id": first["run_id"], "version": first["version"]}
    # the same clips in another dataset have the same version id: its event was taken as done
    shutil.copytree(tmp_path / "data/datasets/clips", tmp_path / "data/datasets/twin")
    twin = pipeline(config=str(config), dataset="twin", version=first["version"])
    assert twin["version"] == first["version"] and "skipped" not in twin
    assert client.get_run(twin["run_id"]).data.tags["mav.dataset"] == "twin"
    with pytest.raises(ValueError, match="min_new_clips must be >= 0, got -1"):  # (a deployment run's parameter)
        pipeline(config=str(config), version=first["version"], new_clips=1, min_new_clips=-1)

    second = pipeline(config=str(config), version=first["version"], force=True)  # --force: run all the same
    assert second["version"] == first["version"] and second["run_id"] != first["run_id"]
    new_children = runs_of(client, "mav-test", f"tags.`mlflow.parentRunId` = '{second['run_id']}'")
    assert [r.info.run_name for r in new_children] == ["evaluate"]  # no stage trained again
    assert second["checkpoints"] == first["checkpoints"]

    # a changed step retrains itself and the steps initialised from it, and no other
    raw = yaml.safe_load(config.read_text())
    raw["steps"][1]["overrides"] = {**raw["steps"][1]["overrides"], "trainer.lr": 0.002}  # decoder_image
    config.write_text(yaml.safe_dump(raw))
    retrained = train(config=str(config))
    (train_parent,) = runs_of(client, "mav-test", "tags.`mav.kind` = 'train-only'")
    trained = {r.info.run_name for r in
               runs_of(client, "mav-test", f"tags.`mlflow.parentRunId` = '{train_parent.info.run_id}'")}
    assert trained == {"decoder_image", "decoder", "interpolation"}
    # the train-only parent logs what it trained from as a pipeline parent does (it logged nothing)
    assert train_parent.data.params["dataset_version"] == first["version"]
    assert train_parent.data.tags["mav.dataset"] == "clips"
    assert train_parent.inputs.dataset_inputs[0].dataset.digest == first["version"]
    assert {"decoder_image_train_loss", "sr_high_samples_per_s"} <= set(train_parent.data.metrics)
    changed = {step for step, path in retrained["checkpoints"].items() if path != first["checkpoints"][step]}
    assert changed == trained

    # the MLflow store deleted by hand and made again at the same URI: cached steps point at runs
    # that are gone, so the step trains again and logs into the new store (a new process, as a
    # user's next command would be: this one keeps connections to the deleted file)
    (tmp_path / "mlflow.db").unlink()
    script = (f"from flows.pipeline import train; from mlflow import MlflowClient; from tests.test_pipeline import runs_of\n"
              f"train({str(config)!r}, ['prior'])\n"
              f"runs = runs_of(MlflowClient({uri!r}), 'mav-test', \"tags.`mav.kind` = 'train'\")\n"
              f"print([(r.info.run_name, r.info.status) for r in runs])")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PREFECT_API_URL": prefect_server})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[('prior', 'FINISHED')]"


@pytest.mark.slow
def test_failed_stage_keeps_earlier_results_and_rerun_resumes_there(prefect_server, tmp_path, video_dir):
    config = write_config(tmp_path, video_dir, steps=chain_steps(*SAMPLES_ONLY, "interpolation"))
    raw = yaml.safe_load(config.read_text())
    raw["steps"][3]["overrides"] = {**FAST, "data.frames": 4000}  # interpolation: clips shorter than the window
    config.write_text(yaml.safe_dump(raw))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(Exception, match="shorter than"):
        pipeline(config=str(config))
    failed_parent = runs_of(client, "mav-test", "tags.`mav.kind` = 'pipeline'")[0]
    assert failed_parent.info.status == "FAILED"
    steps = {r.info.run_name: r.info.status for r in
             runs_of(client, "mav-test", f"tags.`mlflow.parentRunId` = '{failed_parent.info.run_id}'")}
    assert steps == {"prior": "FINISHED", "decoder_image": "FINISHED", "decoder": "FINISHED", "interpolation": "FAILED"}

    raw["steps"][3]["overrides"] = FAST  # fixed
    config.write_text(yaml.safe_dump(raw))
    done = pipeline(config=str(config))
    trained_again = {r.info.run_name for r in
                     runs_of(client, "mav-test", f"tags.`mlflow.parentRunId` = '{done['run_id']}'")}
    assert trained_again == {"interpolation", "evaluate"}  # resumed at the failed stage


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT], ids=["killed", "ctrl-c"])
def test_killed_training_resumes_from_its_last_checkpoint(prefect_server, tmp_path, video_dir, stop):
    """SIGKILL: the worker dies mid-training. Ctrl-C (SIGINT to the terminal's process group): the
    command says where training stopped and exits 130, its MLflow runs end KILLED, not FAILED."""
    config = write_config(tmp_path, video_dir)
    raw = yaml.safe_load(config.read_text())  # the whole chain (the pipeline samples), stopped in its first step
    raw["steps"][0]["overrides"] = {"trainer.max_steps": 60, "trainer.checkpoint_every": 5, "trainer.warmup_steps": 1}
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    # as from a terminal: SIGINT at its default (a shell's background job, CI's maybe, ignores it, and
    # a child inherits that)
    process = subprocess.Popen([sys.executable, "-m", "flows.cli", "pipeline", "--config", str(config)], cwd=REPO,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    checkpoints = tmp_path / "work" / "stages" / "prior"
    deadline = time.time() + 240
    while time.time() < deadline and not list(checkpoints.glob("*/checkpoints/last.ckpt")):  # written whole
        assert process.poll() is None, "the pipeline ended before its first checkpoint"
        time.sleep(0.05)
    os.killpg(process.pid, stop)
    _, err = process.communicate(timeout=120)
    (last,) = list(checkpoints.glob("*/checkpoints/last.ckpt"))
    import torch
    killed_at = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert 0 < killed_at < 60
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    if stop == signal.SIGINT:
        assert process.returncode == 130, err[-3000:]
        said = rf"interrupted: prior stopped at step \d+; {re.escape(str(last))} holds step {killed_at}, "
        assert re.search(said, err), err[-3000:]
        runs = {r.data.tags["mav.kind"]: r.info.status for r in runs_of(client, "mav-test", "")}
        assert runs == {"pipeline": "KILLED", "train": "KILLED"}  # ended by the command itself

    done = train(config=str(config), steps=["prior"])  # the same step, same cache key: it resumes
    assert Path(done["checkpoints"]["prior"]) == last
    # a SIGKILLed process ends none of its runs: the next one ends them as KILLED
    runs = {(r.data.tags["mav.kind"], r.data.tags.get("mav.resumed")): r.info.status
            for r in runs_of(client, "mav-test")}
    assert runs == {("pipeline", None): "KILLED", ("train", "false"): "KILLED",
                    ("train-only", None): "FINISHED", ("train", "true"): "FINISHED"}
    (prior_run,) = runs_of(client, "mav-test", "tags.`mav.step` = 'prior' and tags.`mav.resumed` = 'true'")
    assert prior_run.info.status == "FINISHED" and prior_run.data.metrics["global_step"] == 60
    history = client.get_metric_history(prior_run.info.run_id, "train/loss")
    assert history and min(m.step for m in history) >= killed_at  # went on from there, not from step 0


@pytest.mark.slow
def test_two_pipelines_on_one_work_dir_train_a_step_once(prefect_server, tmp_path, video_dir, caplog):
    """A second run of a step that another process is training waits for it (the step folder's
    lock) and takes its checkpoint: it trains nothing (without the lock it resumed from the
    first one's checkpoint and both wrote the same last.ckpt at once)."""
    from flows.ingest import ingest

    config = write_config(tmp_path, video_dir)
    raw = yaml.safe_load(config.read_text())
    raw["steps"] = raw["steps"][:1]
    raw["steps"][0]["overrides"] = {"trainer.max_steps": 150, "trainer.checkpoint_every": 5, "trainer.warmup_steps": 1}
    config.write_text(yaml.safe_dump(raw))
    ingest(sources=[str(video_dir)], data_root=raw["data_root"], dataset="clips", config=raw["ingest_config"],
           announce=False)
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    first = subprocess.Popen([sys.executable, "-c", f"from flows.pipeline import train; train(config={str(config)!r})"],
                             cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    checkpoints = tmp_path / "work" / "stages" / "prior"
    deadline = time.time() + 240
    while time.time() < deadline and not list(checkpoints.glob("*/checkpoints/last.ckpt")):  # mid-training
        assert first.poll() is None, "the first run ended before its first checkpoint"
        time.sleep(0.05)
    second = train(config=str(config))  # while the first trains
    _, err = first.communicate(timeout=240)
    assert first.returncode == 0, err[-3000:]
    assert "step prior: another run is training it" in caplog.text  # it waited, and said so

    (last,) = list(checkpoints.glob("*/checkpoints/last.ckpt"))
    assert Path(second["checkpoints"]["prior"]) == last
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = runs_of(client, "mav-test", "tags.`mav.step` = 'prior'")
    assert len(runs) == 2 and all(r.data.metrics["global_step"] == 150 for r in runs)
    trained = sorted(len(client.get_metric_history(r.info.run_id, "train/loss")) for r in runs)
    assert trained[0] == 0 and trained[1] > 0  # one run trained; the other logged no training step


def test_a_stage_trained_to_its_end_before_a_failure_is_taken_as_it_is(tmp_path):
    """A rerun finds last.ckpt at the run's last step (training ended, then the task failed, e.g.
    while logging): no step is trained, no loss is made up, and the checkpoint's registered version
    is taken (the same bytes of the same step: it was registered a second time)."""
    import mlflow

    from data_prep.synthetic import write_synthetic_dataset
    from flows.pipeline import train_stage_task

    write_synthetic_dataset(tmp_path / "data", "shapes", num_clips=4, frames=12, size=32, fps=12)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    mlflow.set_tracking_uri(uri)
    parent = mlflow.MlflowClient(uri).create_run(mlflow.set_experiment("x").experiment_id).info.run_id
    args = dict(step_name="prior", stage="prior", config_path=str(TINY / "prior.yaml"),
                overrides={"trainer.max_steps": 2}, data_root=str(tmp_path / "data"), dataset="shapes",
                version="latest", init_checkpoint=None, out_dir=str(tmp_path / "out"), tracking_uri=uri,
                experiment="x", parent_run_id=parent, cache_key="k", model_name="mav-prior")
    first = train_stage_task.fn(**args)
    again = train_stage_task.fn(**args)
    assert first["global_step"] == again["global_step"] == 2 and first["train_loss"] > 0
    assert again["train_loss"] is None and again["checkpoint"] == first["checkpoint"]
    assert (first["model_version"], again["model_version"]) == (1, 1)
    run = mlflow.MlflowClient(uri).get_run(again["run_id"])
    assert "final_train_loss" not in run.data.metrics and run.data.metrics["global_step"] == 2
    # the two runs of the step compare param by param: the config once, under the same names
    trained = mlflow.MlflowClient(uri).get_run(first["run_id"])
    assert set(trained.data.params) == set(run.data.params)
    assert "config.trainer.lr" in trained.data.params and not [key for key in trained.data.params if "/" in key]


def test_small_dataset_versions_add_up_to_the_retraining_threshold(prefect_server, tmp_path):
    """An event counts the clips since the last trained version, not only the version's own."""
    from data_prep.synthetic import write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "data", "clips", num_clips=4, frames=12, size=32)
    config = write_config(tmp_path, tmp_path / "unused", min_new_clips=5)
    version = (tmp_path / "data" / "datasets" / "clips" / "latest").read_text().strip()
    result = pipeline(config=str(config), version=version, new_clips=1)
    assert result == {"skipped": "below threshold", "new_clips": 1, "since_trained": 4}  # 4 untrained clips


def test_clips_cut_again_count_toward_the_retraining_threshold(prefect_server, tmp_path):
    """A version whose sources were cut again (other clip settings, or a URL's bytes changed) holds as
    many clips as the trained one, all of them new: the count difference said 0 and it never retrained."""
    from data_prep.synthetic import write_synthetic_dataset
    from flows.pipeline import code_digest, pipeline_digest
    from flows.pipeline_config import load_pipeline_config
    from flows.tracking import experiment_id

    root = tmp_path / "data"
    write_synthetic_dataset(root, "clips", num_clips=4, frames=12, size=32)
    trained_version = (root / "datasets" / "clips" / "latest").read_text().strip()
    write_synthetic_dataset(root, "clips", num_clips=4, frames=12, size=16)  # the same sources, cut again
    version = (root / "datasets" / "clips" / "latest").read_text().strip()
    config = write_config(tmp_path, tmp_path / "unused", min_new_clips=5)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    digest = pipeline_digest(load_pipeline_config(config), code_digest())
    run = client.create_run(experiment_id(uri, "mav-test"), tags={
        "mav.kind": "pipeline", "mav.dataset": "clips", "mav.dataset_version": trained_version,
        "mav.config_digest": digest})
    client.log_param(run.info.run_id, "num_clips", 4)
    client.set_terminated(run.info.run_id)
    result = pipeline(config=str(config), version=version, new_clips=4)
    assert result == {"skipped": "below threshold", "new_clips": 4, "since_trained": 4}  # was 4 - 4 = 0


def test_the_train_flow_names_a_tracking_server_that_does_not_answer_at_once(prefect_server, tmp_path, video_dir):
    # the train deployment's run: MLflow retried a refused server for about 4 minutes, then failed
    # the flow with a trace (the pipeline flow checks its store as it starts)
    config = write_config(tmp_path, video_dir, steps=chain_steps("prior"))
    with pytest.raises(ValueError, match=r"^tracking URI http://127.0.0.1:1: no MLflow server answers"):
        train(config=str(config), tracking_uri="http://127.0.0.1:1")


def test_a_run_that_skips_the_ingest_does_not_check_the_sources(prefect_server, tmp_path, video_dir):
    # skip_ingest (a deployment parameter): the sources are not read, so sources that are not on this
    # machine are no reason to refuse; the run goes on to the dataset's latest version (none here)
    config = write_config(tmp_path, video_dir, sources=[str(tmp_path / "elsewhere")], steps=chain_steps(*SAMPLES_ONLY))
    with pytest.raises(ValueError, match="dataset 'clips' has no version yet"):
        pipeline(config=str(config), skip_ingest=True)
    with pytest.raises(ValueError, match="sources: no such file or folder"):  # the run that ingests still checks
        pipeline(config=str(config))


def test_the_train_flow_refuses_an_empty_list_of_steps(prefect_server, tmp_path, video_dir):
    # the train deployment's steps emptied: it trained nothing and ended Completed, with an empty MLflow run
    config = write_config(tmp_path, video_dir, steps=chain_steps("prior"))
    with pytest.raises(ValueError, match="^steps: an empty list trains nothing; leave it null to train every step$"):
        train(config=str(config), steps=[])


def test_a_cached_step_whose_model_version_or_run_was_deleted_is_registered_again(prefect_server, tmp_path):
    """A version deleted in the registry (MLflow UI, cleaning up) while its step stays cached: the cached
    result named it, and the pipeline failed at its end, moving the champion, on every run after. The
    same for a version whose run was deleted."""
    from data_prep.synthetic import write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "data", "clips", num_clips=4, frames=12, size=32)
    config = write_config(tmp_path, tmp_path / "unused")
    first = train(config=str(config), steps=["prior"])
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.delete_model_version("mav-prior", "1")
    again = train(config=str(config), steps=["prior"])
    assert again["checkpoints"] == first["checkpoints"]  # not trained again
    (version,) = client.search_model_versions("name = 'mav-prior'")
    assert str(version.version) == "2" and version.tags["mav.sha256"]
    (run,) = runs_of(client, "mav-test", f"attributes.run_id = '{version.run_id}'")
    assert "final_train_loss" not in run.data.metrics  # registered from the checkpoint, no step trained
    # the version's run deleted (its artifact, the version's source, goes at the next `mlflow gc`)
    # while the version stays: it was taken as registered, and the champion pointed at a gone file
    client.delete_run(version.run_id)
    assert train(config=str(config), steps=["prior"])["checkpoints"] == first["checkpoints"]
    newest = max(client.search_model_versions("name = 'mav-prior'"), key=lambda v: int(v.version))
    assert str(newest.version) == "3" and newest.run_id != version.run_id
    assert client.get_run(newest.run_id).info.lifecycle_stage == "active"


def test_config_sources_keep_urls_and_find_relative_paths_in_the_repository(tmp_path, monkeypatch):
    from flows.pipeline import ingest_sources

    monkeypatch.chdir(tmp_path)  # data/samples is not relative to the working directory here
    url = "https://example.com/videos/clip.mp4"
    assert ingest_sources([url, "data/samples", "/abs/videos"]) == [url, str(REPO / "data/samples"), "/abs/videos"]


def test_a_clip_that_cannot_load_stops_the_pipeline_before_anything_runs(tmp_path, video_dir):
    """The base configs name CLIP by hub id: on a host that neither has it cached nor reaches the hub
    (a GPU host), the first stage failed after the ingest and CLIPSIM after all the training."""
    from flows.pipeline import check_places
    from flows.pipeline_config import load_pipeline_config

    empty = tmp_path / "empty-clip"
    empty.mkdir()
    cases = {  # (a stage's clip, evaluate.clip_model) -> the error
        (str(tmp_path / "no-clip"), "tiny"): r"step decoder: clip: CLIP '\S+no-clip': no such folder",
        (str(empty), "tiny"): r"step decoder: clip: CLIP '\S+empty-clip' cannot be loaded",
        ("tiny", str(empty)): r"evaluate.clip_model: CLIP '\S+empty-clip' cannot be loaded",
    }
    for (stage_clip, eval_clip), message in cases.items():
        config = load_pipeline_config(write_config(tmp_path, video_dir))
        config.steps[2].overrides["clip"] = stage_clip  # the video decoder
        config.steps[4].overrides["clip"] = str(tmp_path / "unused")  # sr_low loads no CLIP: not checked
        config.evaluate.clip_model = eval_clip
        with pytest.raises(ValueError, match=message):
            check_places(config, None, ingests=True)
    config.steps[2].overrides["clip"] = "tiny"
    check_places(config, None, ingests=True, evaluates=False)  # no CLIPSIM: its CLIP is not needed


def test_checking_a_pipeline_config_imports_no_training_stack(tmp_path, video_dir):
    """A run that trains nothing (an event below the threshold, a version already done, a config
    error) checks its config and stops: importing Lightning for that cost ~8 s per run on 2 cores,
    torch ~1.7 s."""
    config = write_config(tmp_path, video_dir)
    script = ("import sys\n"
              "from flows.pipeline import check_places\n"
              "from flows.pipeline_config import load_pipeline_config\n"
              f"check_places(load_pipeline_config({str(config)!r}), None, ingests=True)\n"
              "print(sorted(m for m in ('torch', 'lightning', 'transformers', 'diffusers') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_champion_follows_each_versions_best_chain_under_the_configured_prefix(tmp_path):
    """A version reused by a later, worse chain keeps its score: a worse new version cannot beat it."""
    import logging

    from flows.registry import move_champion, register_checkpoint

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("champion")

    def new_version(step):
        run = client.create_run(experiment)
        client.set_terminated(run.info.run_id)
        name = registered_name(step, "team")
        source = f"{run.info.artifact_uri}/x.ckpt"
        return {"step": step, "model_version": register_checkpoint(client, run.info.run_id, source, name, step, "key")}

    def _move(client, items, metric, fvd):
        return move_champion(client, items, metric, fvd, "champion", "team", logging.getLogger("test"), "same")

    def move(items, fvd):
        return _move(client, items, "fvd", fvd)

    prior_1, sr_1 = new_version("prior"), new_version("sr_high")
    assert move([prior_1, sr_1], 100.0) == ["team-prior v1", "team-sr-high v1"]
    sr_2 = new_version("sr_high")
    assert move([prior_1, sr_2], 300.0) == []  # prior v1 reused around a worse sr_high
    assert client.get_model_version("team-prior", "1").tags["mav.fvd"] == "100.0"
    prior_2 = new_version("prior")
    assert move([prior_2, sr_1], 200.0) == []  # worse than the 100 that prior v1 scored
    assert str(client.get_model_version_by_alias("team-prior", "champion").version) == "1"
    assert move([prior_2, sr_1], 50.0) == ["team-prior v2"]
    assert client.get_model_version("team-sr-high", "1").tags["mav.fvd"] == "50.0"  # its best chain now
    # smoke scores (random-weight I3D, e.g. the demo logged to the same store) never displace a
    # champion with a real FVD, however small; a real FVD displaces a smoke-scored champion
    prior_3 = new_version("prior")
    assert _move(client, [prior_3], "smoke_fvd", 1.0) == []
    assert str(client.get_model_version_by_alias("team-prior", "champion").version) == "2"
    client.set_registered_model_alias("team-prior", "champion", prior_3["model_version"])  # smoke-scored champion
    assert move([prior_2], 1e6) == ["team-prior v2"]


def test_champion_moves_only_on_an_fvd_of_the_same_evaluation_settings(tmp_path):
    """An FVD of other settings (real clips drawn, clip length, fps, detector) is another number: a
    chain scored on 8 real clips displaced a champion scored on 2048 whenever its value was lower."""
    import logging

    from flows.pipeline import fvd_settings
    from flows.registry import move_champion, register_checkpoint

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("settings")

    def new_version():
        run = client.create_run(experiment)
        client.set_terminated(run.info.run_id)
        source = f"{run.info.artifact_uri}/x.ckpt"
        return {"step": "prior", "model_version": register_checkpoint(client, run.info.run_id, source, "mav-prior",
                                                                      "prior", "key")}

    def move(items, fvd, settings):
        return move_champion(client, items, "fvd", fvd, "champion", "mav", logging.getLogger("test"), settings)

    def champion():
        return str(client.get_model_version_by_alias("mav-prior", "champion").version)

    result = {"num_fake": 4, "clip_length": 16, "clip_fps": None, "clip_stride": 1, "unbiased": False,
              "detector_sha256": "ab" * 32}
    full, quick = fvd_settings(result, "clips", 2048), fvd_settings(result, "clips", 8)
    at_20 = fvd_settings(result | {"clip_fps": 20.0}, "clips", 2048)
    assert len({full, quick, at_20, fvd_settings(result | {"clip_length": 8}, "clips", 2048),
                fvd_settings(result | {"detector_sha256": "cd" * 32}, "clips", 2048)}) == 5
    first = new_version()
    assert move([first], 300.0, full) == ["mav-prior v1"]
    for settings in (quick, at_20):  # lower, but not comparable
        assert move([new_version()], 100.0, settings) == [] and champion() == "1"
    assert move([first], 400.0, at_20) == []  # the champion scored again under these settings
    tags = client.get_model_version("mav-prior", "1").tags
    assert (tags["mav.fvd"], tags["mav.fvd_settings"]) == ("400.0", at_20)
    assert move([new_version()], 350.0, at_20) == ["mav-prior v4"]  # now comparable, and better


def test_a_store_error_on_the_champion_lookup_is_raised_not_read_as_no_champion(tmp_path):
    """Only "this model has no such alias" means no champion: a store that fails the lookup (down,
    locked) used to hand the alias to whatever the run trained, however bad its FVD."""
    import logging

    from mlflow.exceptions import MlflowException

    from flows.registry import move_champion, register_checkpoint

    class FailingLookup(MlflowClient):  # a real store, whose alias lookup alone fails
        def get_model_version_by_alias(self, name, alias):
            raise MlflowException("database is locked", error_code="TEMPORARILY_UNAVAILABLE")

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("lookup"))
    client.set_terminated(run.info.run_id)

    def move(store, fvd):
        version = register_checkpoint(client, run.info.run_id, f"{run.info.artifact_uri}/x.ckpt", "mav-prior",
                                      "prior", "key")
        return move_champion(store, [{"step": "prior", "model_version": version}], "fvd", fvd, "champion", "mav",
                             logging.getLogger("test"), "same")

    assert move(client, 100.0) == ["mav-prior v1"]  # no alias yet: the first version is champion
    with pytest.raises(MlflowException, match="database is locked"):
        move(FailingLookup(uri), 900.0)
    assert str(client.get_model_version_by_alias("mav-prior", "champion").version) == "1"


def test_a_stage_run_stays_running_until_its_checkpoint_is_registered(tmp_path):
    """Lightning ends its logger's run as fit returns; the stage's run must stay RUNNING until the
    flow has logged and registered the checkpoint (a kill in between leaves it RUNNING, which the
    next run ends as KILLED, not FINISHED without a model version)."""
    from flows.pipeline import stage_logger
    from flows.tracking import experiment_id

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    run = client.create_run(experiment_id(uri, "stages"))
    logger = stage_logger("stages", uri, run.info.run_id)
    logger.log_metrics({"train/loss": 0.5}, step=1)
    logger.finalize("success")  # what Lightning calls when fit returns
    assert client.get_run(run.info.run_id).info.status == "RUNNING"
    assert client.get_metric_history(run.info.run_id, "train/loss")[0].value == 0.5


def test_a_relative_sqlite_uri_keeps_its_artifacts_beside_the_store(tmp_path, monkeypatch):
    """MLFLOW_TRACKING_URI=sqlite:///mlflow.db (MLflow's own example) made no experiment: `mav evaluate`
    failed after scoring, `mav pipeline` after its ingest ("relative path can't be expressed as a file URI")."""
    from flows.tracking import experiment_id

    monkeypatch.chdir(tmp_path)
    uri = "sqlite:///mlflow.db"
    experiment = MlflowClient(uri).get_experiment(experiment_id(uri, "evaluate"))
    assert experiment.artifact_location == (tmp_path / "mlartifacts" / "evaluate").as_uri()
    assert (tmp_path / "mlflow.db").is_file()


def test_checkpoint_links_follow_the_latest_chain(tmp_path):
    from flows.pipeline import link_chain

    for name in ("a.ckpt", "b.ckpt", "c.ckpt"):
        (tmp_path / name).write_bytes(b"")
    folder = tmp_path / "work" / "checkpoints"
    link_chain({"prior": tmp_path / "a.ckpt", "sr_low": tmp_path / "b.ckpt"}, folder)
    link_chain({"prior": tmp_path / "c.ckpt"}, folder)  # a later run without sr_low
    assert {p.name: p.resolve().name for p in folder.iterdir()} == {"prior.ckpt": "c.ckpt"}


def test_only_runs_of_processes_known_to_be_gone_are_ended(tmp_path, capsys):
    """A run whose process (pid and start time, on this machine) is gone ends KILLED, as does a run of
    another host or PID namespace silent for over STALE_AFTER_S (its heartbeat); this process's own
    runs, other hosts' runs that beat, untagged (older) runs and malformed tags stay."""
    from flows.tracking import STALE_AFTER_S, end_orphaned_runs, experiment_id, process_tags

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    exp = experiment_id(uri, "orphans")
    child = subprocess.Popen([sys.executable, "-c", "from flows.tracking import process_tags; "
                              "print(process_tags()['mav.process'])"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    gone = child.communicate()[0].strip()
    mine = process_tags()
    space, pid, start = mine["mav.process"].split("|")
    silent = f"{time.time() - STALE_AFTER_S - 120:.0f}"
    cases = {
        "gone": {**mine, "mav.process": gone},
        "mine": mine,
        "mine, silent": {**mine, "mav.heartbeat": silent},  # a living process here: its pid says so
        "reused pid": {**mine, "mav.process": f"{space}|{pid}|{float(start) - 5:.2f}"},
        "other host": {**mine, "mav.host": "elsewhere", "mav.process": gone},
        "other host, silent": {**mine, "mav.host": "elsewhere", "mav.process": gone, "mav.heartbeat": silent},
        "other namespace": {**mine, "mav.process": f"another boot|{gone.split('|', 1)[1]}"},
        "other namespace, silent": {**mine, "mav.process": f"another boot|{gone.split('|', 1)[1]}",
                                    "mav.heartbeat": silent},
        "untagged": {},
        "malformed": {**mine, "mav.process": "abc", "mav.heartbeat": "soon"},
    }
    for name, tags in cases.items():
        client.create_run(exp, run_name=name, tags=tags)
    ended = ["gone", "other host, silent", "other namespace, silent", "reused pid"]
    assert sorted(end_orphaned_runs(uri, "orphans")) == ended
    status = {r.info.run_name: r.info.status for r in client.search_runs([exp])}
    assert status == {name: "KILLED" if name in ended else "RUNNING" for name in cases}
    said = capsys.readouterr().out
    assert "other host, silent (no heartbeat from elsewhere for 17 min)" in said, said
    assert f"gone (process {gone.split('|')[1]} is gone)" in said, said


def test_a_run_beats_while_it_runs_and_stops_when_it_ends(tmp_path, monkeypatch):
    """start_run stamps `mav.heartbeat` every HEARTBEAT_S (here 0.05 s) until the run ends: a run
    of another machine that is still running is never taken for a dead one."""
    import mlflow

    from flows import tracking

    monkeypatch.setattr(tracking, "HEARTBEAT_S", 0.05)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    tracking.experiment_id(uri, "beats")
    tracking.use_experiment(uri, "beats")
    client = MlflowClient(uri)
    with tracking.start_run(run_name="beating") as run:
        client.set_tag(run.info.run_id, "mav.heartbeat", "0")  # as if silent since 1970
        deadline = time.time() + 30
        while client.get_run(run.info.run_id).data.tags["mav.heartbeat"] == "0" and time.time() < deadline:
            time.sleep(0.05)
        assert abs(float(client.get_run(run.info.run_id).data.tags["mav.heartbeat"]) - time.time()) < 30
    assert mlflow.active_run() is None
    assert not [t for t in threading.enumerate() if t.name.startswith("mav-heartbeat")]


def test_a_store_that_refuses_the_killed_status_does_not_replace_the_ctrl_c(tmp_path, capsys):
    """Ctrl-C, and the store refuses to end the run (seen once: a SQLite write lock held past MLflow's
    20 s wait; here: the run was deleted meanwhile, which MLflow refuses at once): the KeyboardInterrupt
    goes on (the command exits 130), not the MLflow error (exit 1 with its traceback), and one line says
    what was left; the parent run still ends KILLED."""
    import mlflow

    from flows.tracking import experiment_id, start_run, use_experiment

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    experiment_id(uri, "refused")
    use_experiment(uri, "refused")
    with pytest.raises(KeyboardInterrupt):
        with start_run(run_name="parent") as parent:
            with start_run(run_name="stopped", nested=True) as run:
                MlflowClient(uri).delete_run(run.info.run_id)
                raise KeyboardInterrupt
    assert mlflow.active_run() is None
    assert f"MLflow run {run.info.run_id} is left RUNNING (" in capsys.readouterr().err
    assert MlflowClient(uri).get_run(parent.info.run_id).info.status == "KILLED"


def test_a_flow_stopped_by_sigterm_ends_its_run_killed(prefect_server, tmp_path):
    """Prefect stops a deployment's flow run (cancelled, its worker shut down) with SIGTERM, which its engine
    raises in the flow as TerminationSignal: MLflow's own context marked the run FAILED, as for an error."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    script = (f"import os, signal\nfrom prefect import flow\nfrom flows.tracking import start_run, use_experiment\n"
              f"@flow\ndef stopped():\n    use_experiment({uri!r}, 'x')\n    with start_run(run_name='stopped'):\n"
              f"        os.kill(os.getpid(), signal.SIGTERM)\n        raise AssertionError('no SIGTERM')\n"
              f"stopped()\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PREFECT_API_URL": prefect_server})
    client = MlflowClient(uri)
    (run,) = runs_of(client, "x")
    assert run.info.status == "KILLED", done.stderr[-3000:]


def test_a_ctrl_c_inside_an_mlflow_query_still_ends_the_runs_killed(tmp_path):
    """A Ctrl-C that lands while MLflow's SQLite store reads (SQLAlchemy has run a SELECT, its rows not yet
    fetched) makes SQLAlchemy close that connection, but the cursor, kept by the interrupt's traceback,
    holds SQLite's shared lock on the file until it is freed: ending the runs KILLED then waited MLflow's
    20 s and failed ('database is locked', the runs left RUNNING). Seen in the Ctrl-C pipeline test when
    the interrupt came as Lightning logged train/loss. A real SIGINT, sent when the store's SELECT of the
    run has executed."""
    import mlflow

    from flows.tracking import experiment_id, start_run, use_experiment
    from tests.interrupts import CtrlCInRunsQuery

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    experiment_id(uri, "interrupted")
    use_experiment(uri, "interrupted")
    with CtrlCInRunsQuery() as ctrl_c:
        with pytest.raises(KeyboardInterrupt):
            with start_run(run_name="parent") as parent:
                with start_run(run_name="stopped", nested=True) as run:
                    ctrl_c.arm()
                    mlflow.log_metric("loss", 1.0, step=1)  # reads the run first (log_batch)
        assert ctrl_c.sent_at is not None, "the interrupt was never sent"
        assert time.monotonic() - ctrl_c.sent_at < 15  # not after MLflow's 20 s wait for the lock
    client = MlflowClient(uri)
    assert client.get_run(run.info.run_id).info.status == "KILLED"
    assert client.get_run(parent.info.run_id).info.status == "KILLED"
