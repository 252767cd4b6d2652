"""The end-to-end `pipeline` flow: ingest -> train every stage -> sample -> evaluate -> register.

MLflow: one parent run per pipeline run, a nested run per stage and one for the
evaluation. Prefect: each stage is a cached task whose key is its config, the
dataset version, the code and the step it starts from, so an unchanged stage is
not trained again and a rerun after a failure resumes at the first unfinished stage
(from that stage's last checkpoint when it was killed mid-training).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import math
import sys
import warnings
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE as NO_CACHE

from data_prep.atomic import replacing
from flows.cli import writable_folder
from flows.ingest import ingest
from flows.pipeline_config import PipelineConfig, TrainStep, load_pipeline_config, repo_path
from flows.registry import model_version, move_champion, register_checkpoint, registered_name, run_is_there
from flows.tracking import (check_tracking, default_tracking_uri, end_orphaned_runs, start_run, store_identity,
                            use_experiment)
from models.compat import CLIP_STAGES

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = "configs/tiny/pipeline.yaml"


def code_digest() -> str:
    """The models package's source: a change to it retrains every stage."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "models").rglob("*.py")):
        digest.update(path.relative_to(REPO).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def pipeline_digest(cfg: PipelineConfig, code: str) -> str:
    """What a finished run of a dataset version depends on: the pipeline config, the stage configs
    it names (their files' text), their image-text pairs and the models' code, as each step's cache key does."""
    stage_configs = [Path(repo_path(step.config)).read_text() for step in cfg.steps]
    images = [image_pairs_digest(step) for step in cfg.steps]
    payload = json.dumps([cfg.model_dump(mode="json"), stage_configs, code]
                         + ([images] if any(images) else []), sort_keys=True)  # (digests of runs before: kept)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def step_key(step: TrainStep, version: str, init_key: str | None, code: str, where: str) -> str:
    images = image_pairs_digest(step)
    # a step on image-text pairs never reads the video dataset: a new version of it is no reason to
    # retrain (the base prior, 86M parameters, was retrained for every one)
    payload = {"step": step.model_dump(), "config": Path(repo_path(step.config)).read_text(),
               "dataset_version": None if images else version, "init": init_key, "code": code, "where": where}
    if images:  # (keys of steps on video: as before, still cached)
        payload["images"] = images
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def image_pairs_digest(step: TrainStep) -> str | None:
    """The image-text pairs a step on `data.source: images` reads, as the names, sizes and modification
    times of the files under data.image_path: pairs added or replaced retrain it, as a new dataset
    version does the steps on video. None for a step on video."""
    from models.config import load_config

    data = load_config(repo_path(step.config), step.overrides).data
    if data.source != "images" or not data.image_path:
        return None
    root = Path(data.image_path).expanduser()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(root.parent)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _flatten(prefix: str, value, out: dict) -> dict:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), inner, out)
    else:
        out[prefix] = value
    return out


def as_params(prefix: str, value) -> dict[str, str]:
    """A nested setting as MLflow params `prefix.key...`, each value cut to MLflow's limit (6000)."""
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    return {key: str(inner)[:MAX_PARAM_VAL_LENGTH] for key, inner in _flatten(prefix, value, {}).items()}


@functools.cache
def quiet_library_chatter() -> None:
    """Keep the flow's log readable: Lightning's per-fit banners (device lines, a LitLogger tip),
    MLflow's system-metrics start/stop lines, transformers' loading bars and a torch deprecation
    inside Lightning repeat for every stage. Their warnings and errors still show."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights" bars of the CLIP load


def stage_logger(experiment: str, tracking_uri: str, run_id: str):
    """Lightning's MLflow logger for a stage run that the flow ends itself. Lightning's own marks it
    FINISHED as `fit` returns, before the checkpoint is logged and registered: a process killed then
    left a FINISHED run without its model version, which no later run ends as KILLED."""
    from lightning.pytorch.loggers import MLFlowLogger

    class FlowEndsTheRun(MLFlowLogger):
        def finalize(self, status: str = "success") -> None:
            pass  # (and logs no checkpoints: log_model is off)

        def log_hyperparams(self, params) -> None:
            pass  # the flow logs the typed config as config.* in every run of a step; Lightning's config/...
            # copy of it came only with a fit, so a run that took a finished checkpoint lacked half the params

    return FlowEndsTheRun(experiment_name=experiment, tracking_uri=tracking_uri, run_id=run_id)


@task(name="train-stage", cache_key_fn=lambda context, params: params["cache_key"], persist_result=True,
      task_run_name="train {step_name}")
def train_stage_task(step_name: str, stage: str, config_path: str, overrides: dict, data_root: str, dataset: str,
                     version: str, init_checkpoint: str | None, out_dir: str, tracking_uri: str, experiment: str,
                     parent_run_id: str, cache_key: str, model_name: str) -> dict:
    """Train one stage in a nested MLflow run; resume from its last checkpoint if a killed run left one."""
    import mlflow
    from mlflow import MlflowClient

    from data_prep.dataset import file_lock
    from data_prep.download import sha256_file
    from models.config import load_config
    from models.train import AlreadyTrained, TrainResult, train_stage

    quiet_library_chatter()
    # one trainer per step folder: a second pipeline on the same work_dir waits here, then takes the
    # checkpoint the first one finished (AlreadyTrained) instead of writing the same last.ckpt at once
    # (print, not a run logger: the task may run outside a flow, as its .fn)
    with file_lock(Path(out_dir) / ".lock",
                   lambda: print(f"step {step_name}: another run is training it ({out_dir}): waiting for it")):
        config = load_config(config_path, overrides)
        last = Path(out_dir) / "checkpoints" / "last.ckpt"
        resume = last.exists()
        use_experiment(tracking_uri, experiment)
        tags = {"mav.kind": "train", "mav.stage": stage, "mav.step": step_name, "mav.cache_key": cache_key,
                "mav.dataset": dataset, "mav.dataset_version": version, "mav.resumed": str(resume).lower()}
        with start_run(run_name=step_name, parent_run_id=parent_run_id, nested=True, tags=tags,
                       log_system_metrics=True) as run:
            mlflow.log_params(as_params("config", config.model_dump(mode="json"))
                              | {"init_checkpoint": init_checkpoint or "none", "config_file": config_path})
            logger = stage_logger(experiment, tracking_uri, run.info.run_id)
            try:
                result = train_stage(stage, config, data_root=data_root, dataset=dataset, version=version,
                                     init=None if resume else init_checkpoint,
                                     resume=resume, out_dir=out_dir, logger=logger)
            except AlreadyTrained as done:  # trained to the end by a run that then failed, or by another pipeline
                result = TrainResult(stage, done.checkpoint, None, done.step, float("nan"))
            loss = result.train_loss if math.isfinite(result.train_loss) else None  # None: no step trained
            speed = {"samples_per_s": result.samples_per_s, "data_wait": result.data_wait,  # over the run
                     "tflops": result.tflops, "mfu": result.mfu}
            mlflow.log_metrics({"global_step": result.global_step}
                               | ({"final_train_loss": loss} if loss is not None else {})
                               | {name: value for name, value in speed.items() if value is not None})
            mlflow.log_artifact(str(result.checkpoint), artifact_path="checkpoints")
            source = f"{run.info.artifact_uri}/checkpoints/{result.checkpoint.name}"
            version_number = register_checkpoint(MlflowClient(tracking_uri), run.info.run_id, source, model_name,
                                                 step_name, cache_key, sha256_file(result.checkpoint))
        return {"step": step_name, "stage": stage, "checkpoint": str(result.checkpoint), "run_id": run.info.run_id,
                "global_step": result.global_step, "train_loss": loss, "samples_per_s": result.samples_per_s,
                "cache_key": cache_key, "model_version": version_number, "parent_run_id": parent_run_id}


@task(name="sample", cache_policy=NO_CACHE)
def sample_task(prompts: list[str], checkpoints: dict[str, str], out_dir: str, steps, guidance, seed: int) -> list[dict]:
    import torch

    from models.sampling import sample_videos

    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = sample_videos(prompts, checkpoints, out_dir, steps=steps, guidance=guidance, seed=seed, device=device)
    gif_dir = Path(out_dir).parent / "gif"  # previews apart, so the folder of mp4s is the evaluated set
    gif_dir.mkdir(exist_ok=True)
    for r in results:
        if r.gif:
            r.gif = Path(r.gif).rename(gif_dir / Path(r.gif).name)
    return [{"prompt": r.prompt, "mp4": str(r.mp4), "gif": str(r.gif) if r.gif else None,
             "frames": int(r.frames.shape[0]), "seed": r.seed} for r in results]


def _latest_finished_run(tracking_uri: str, experiment: str, config_digest: str, **tags: str):
    """The newest finished pipeline run of this config whose `mav.<key>` tags match `tags`, or None."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    conditions = ["tags.`mav.kind` = 'pipeline'", f"tags.`mav.config_digest` = '{config_digest}'",
                  *(f"tags.`mav.{key}` = '{value}'" for key, value in tags.items()), "attributes.status = 'FINISHED'"]
    runs = client.search_runs([exp.experiment_id], filter_string=" and ".join(conditions),
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def clips_since(manifest, trained, data_root: Path, dataset: str) -> int:
    """The version's clips that the trained run's version lacks. Not the difference of the counts:
    sources cut again (other clip settings, a URL's new bytes) replace as many clips as they bring."""
    from data_prep.dataset import load_manifest

    if trained is None:
        return len(manifest)
    try:
        before = load_manifest(data_root, dataset, trained.data.tags["mav.dataset_version"])
    except (KeyError, ValueError):  # that version is gone (or the run is untagged): the counts alone
        return len(manifest) - int(trained.data.params.get("num_clips", 0))
    return int((~manifest["clip_id"].isin(set(before["clip_id"]))).sum())


@flow(name="pipeline", log_prints=True)
def pipeline(config: str = DEFAULT_CONFIG, dataset: str | None = None, data_root: str | None = None,
             version: str | None = None, new_clips: int | None = None, min_new_clips: int | None = None,
             tracking_uri: str | None = None, skip_ingest: bool = False, force: bool = False) -> dict:
    """Raw video to a scored, registered model. Called by a dataset event, `version` and
    `new_clips` come from the event: with fewer than `min_new_clips` clips since the last trained
    version it does nothing, and a version that already has a finished pipeline run (this config)
    is not trained again."""
    import mlflow
    from mlflow import MlflowClient

    log = get_run_logger()
    quiet_library_chatter()
    cfg: PipelineConfig = load_pipeline_config(config)
    ingests = version is None and not skip_ingest
    check_places(cfg, data_root, ingests=ingests)  # (mav pipeline did; a deployment's run did not)
    dataset = dataset or cfg.dataset
    data_root = str(Path(data_root or cfg.data_root).resolve())
    tracking_uri = tracking_uri or cfg.tracking_uri or default_tracking_uri()
    check_tracking(tracking_uri, cfg.experiment)  # (a deployment's run: before its ingest)
    threshold = cfg.min_new_clips if min_new_clips is None else int(min_new_clips)
    if threshold < 0:  # (a deployment run's parameter; the config's is checked as it loads)
        raise ValueError(f"min_new_clips must be >= 0, got {threshold}")
    if any("tiny" in Path(step.config).parts for step in cfg.steps):  # also in a copied pipeline config
        print("tiny configs: tiny models trained from scratch on this machine, a tiny random CLIP built "
              "locally, and random-weight I3D/CLIP for the metrics (values are labelled smoke)")

    from_event = version is not None  # a dataset event names the version; a person runs without one
    if ingests:
        summary = ingest(sources=ingest_sources(cfg.sources), data_root=data_root, dataset=dataset,
                         config=repo_path(cfg.ingest_config), announce=False)  # this run trains on it
        version = summary["version"]
    from data_prep.dataset import load_manifest

    manifest = load_manifest(Path(data_root), dataset, version)
    version = manifest.attrs["version"]
    code = code_digest()
    config_digest = pipeline_digest(cfg, code)
    if new_clips is not None:  # an event: count from the last trained version, so small versions add up
        trained = _latest_finished_run(tracking_uri, cfg.experiment, config_digest, dataset=dataset)
        pending = clips_since(manifest, trained, Path(data_root), dataset)
        if pending < threshold:
            print(f"{pending} clips since the last trained version of {dataset} (this version added {new_clips}) "
                  f"< min_new_clips {threshold}: not retraining")
            return {"skipped": "below threshold", "new_clips": int(new_clips), "since_trained": pending}
    # a finished run of this version and config: a repeated event, not new work
    done = (_latest_finished_run(tracking_uri, cfg.experiment, config_digest, dataset=dataset, dataset_version=version)
            if from_event and not force else None)  # (the same clips in two datasets have one version id)
    if done is not None:
        print(f"dataset {dataset}@{version} already has a finished pipeline run ({done.info.run_id}): nothing to do")
        return {"skipped": "already done", "run_id": done.info.run_id, "version": version}

    use_experiment(tracking_uri, cfg.experiment)
    end_orphaned_runs(tracking_uri, cfg.experiment)
    work = Path(cfg.work_dir).resolve()
    tags = {"mav.kind": "pipeline", "mav.dataset": dataset, "mav.dataset_version": version,
            "mav.config_digest": config_digest, "mav.code": code}
    with start_run(run_name=f"pipeline {dataset}@{version}", tags=tags, log_system_metrics=True) as parent:
        log_training_inputs(config, cfg, dataset, version, data_root, manifest)
        # how the parent's FVD / CLIPSIM were sampled and scored, for comparing parents
        mlflow.log_params(as_params("sample", cfg.sample.model_dump(mode="json"))
                          | as_params("evaluate", cfg.evaluate.model_dump(mode="json")))
        trained = _train_steps(cfg, dataset, data_root, version, tracking_uri, parent.info.run_id, code)
        log_step_results(trained, parent.info.run_id)
        checkpoints = {result["step"]: result["checkpoint"] for result in trained}

        # the last step of each stage feeds the sampling chain
        chain = {step.stage: checkpoints[step.name] for step in cfg.steps}
        link_chain(chain, work / "checkpoints")
        sample_dir = work / "samples" / parent.info.run_id / "videos"
        samples = sample_task(cfg.sample.prompts, chain, str(sample_dir), cfg.sample.steps, cfg.sample.guidance,
                              cfg.sample.seed)
        for item in samples:
            mlflow.log_artifact(item["mp4"], artifact_path="samples")
            if item["gif"]:
                mlflow.log_artifact(item["gif"], artifact_path="samples")
        # with the videos, so `mav evaluate --fake runs:/<this run>` finds their prompts (and each one's seed)
        mlflow.log_artifact(str(sample_dir / "prompts.json"), artifact_path="samples")
        mlflow.log_artifact(str(sample_dir / "samples.json"), artifact_path="samples")

        from flows.evaluate import evaluate

        ev = cfg.evaluate
        metrics_wanted = list(ev.metrics)
        if "fvd" in metrics_wanted and len(manifest) < 2:  # no covariance from one clip
            print(f"FVD skipped: dataset {dataset}@{version} has {len(manifest)} clip; FVD needs at least 2")
            metrics_wanted.remove("fvd")
        scores = evaluate(real=f"{dataset}@{version}", fake=str(sample_dir), prompts=str(sample_dir / "prompts.json"),
                          metrics=metrics_wanted, num_videos=ev.num_videos, i3d_weights=ev.i3d_weights,
                          i3d_sha256=ev.i3d_sha256, clip_model=ev.clip_model, data_root=data_root,
                          tracking_uri=tracking_uri, clip_length=ev.clip_length, fps=ev.fps,
                          num_resamples=ev.num_resamples,
                          experiment=cfg.experiment, parent_run_id=parent.info.run_id, run_name="evaluate")
        metrics = scores["metrics"]  # the names the evaluate run logged, on the parent run too
        mlflow.log_metrics(metrics)
        fvd_key = next((k for k in ("fvd", "smoke_fvd") if k in metrics), None)
        moved = []
        if fvd_key:
            moved = move_champion(MlflowClient(tracking_uri), trained, fvd_key, metrics[fvd_key],
                                   cfg.registry.alias, cfg.registry.model_prefix, log,
                                   fvd_settings(scores["results"]["fvd"], dataset, ev.num_videos))
        run_id = parent.info.run_id

    store = tracking_uri.removeprefix("sqlite:///")
    summary = {"run_id": run_id, "dataset": dataset, "version": version, "metrics": metrics, "samples": samples,
               "checkpoints": checkpoints, "champion_moved": moved, "tracking_uri": tracking_uri}
    for line in scores["lines"]:
        print(line)
    print(f"sample video: {samples[0]['mp4']}")
    print(f"sample more: mav sample --checkpoints {work / 'checkpoints'} --prompt \"...\" --out video.mp4")
    print(f"champion alias moved: {', '.join(moved) if moved else 'no'}")
    prefix = "" if cfg.registry.model_prefix == "mav" else f" --model-prefix {cfg.registry.model_prefix}"
    print(f"sample the {cfg.registry.alias}s: mav sample --registry {cfg.registry.alias}{prefix} --tracking-uri "
          f"{tracking_uri} --prompt \"...\" --out video.mp4")
    print(f"MLflow UI: mlflow ui --backend-store-uri {tracking_uri}   (then open http://127.0.0.1:5000)"
          if store != tracking_uri else f"MLflow: {tracking_uri}")
    return summary


def fvd_settings(result: dict, dataset: str, num_videos: int | None) -> str:
    """What an FVD value depends on besides the models: only values of the same settings are compared
    for the champion. The real set's version is left out (a retrained chain is scored against the
    version it trained on), so is the real clip count it gives when num_videos is unset."""
    fps = "native" if result["clip_fps"] is None else f"{result['clip_fps']:g}"
    return (f"real {dataset}, N {num_videos or 'all'}+{result['num_fake']}, {result['clip_length']} frames at {fps} "
            f"fps, stride {result['clip_stride']}, {'unbiased' if result['unbiased'] else 'biased'}, "
            f"detector {result['detector_sha256'][:16]}")


def link_chain(chain: dict[str, str], folder: Path) -> None:
    """<folder>/<stage>.ckpt -> the checkpoint of the stage's last step: the chain of the latest
    run, where `mav sample --checkpoints` and `mav evaluate --checkpoints` look."""
    folder.mkdir(parents=True, exist_ok=True)
    for stage, checkpoint in chain.items():
        with replacing(folder / f"{stage}.ckpt") as temp:  # a reader sees the old link or the new one
            temp.symlink_to(Path(checkpoint).resolve())
    for stale in folder.glob("*.ckpt"):  # a stage an earlier run had and this one has not
        if stale.stem not in chain and stale.is_symlink():
            stale.unlink()


def ingest_sources(sources: list[str]) -> list[str]:
    """A config's sources for ingest: URLs as they are, relative paths from the repository when
    they are not relative to the working directory."""
    return [source if "://" in source else repo_path(source) for source in sources]


@flow(name="train", log_prints=True)
def train(config: str = DEFAULT_CONFIG, steps: list[str] | None = None, dataset: str | None = None,
          data_root: str | None = None, version: str | None = None, tracking_uri: str | None = None) -> dict:
    """Train one step, several, or all (steps=None) of a pipeline config, with the same caching."""
    cfg = load_pipeline_config(config)
    if steps is not None and not steps:  # (a deployment run's list emptied in the form) trained nothing, Completed
        raise ValueError("steps: an empty list trains nothing; leave it null to train every step")
    selected = [s for s in cfg.steps if steps is None or s.name in steps]
    unknown = set(steps or []) - {s.name for s in cfg.steps}
    if unknown:
        raise ValueError(f"unknown steps {sorted(unknown)}; the config has {', '.join(s.name for s in cfg.steps)}")
    needed = {s.name for s in selected}
    for step in reversed(cfg.steps):  # a step needs the steps it starts from
        if step.name in needed and step.init_from:
            needed.add(step.init_from)
    sub = cfg.model_copy(update={"steps": [s for s in cfg.steps if s.name in needed]})
    return _train_only(config, sub, dataset or cfg.dataset, data_root or cfg.data_root, version, tracking_uri)


def log_training_inputs(config: str, cfg: PipelineConfig, dataset: str, version: str, data_root: str, manifest) -> None:
    """What a parent run trains from, in the active run: the config, the dataset version (as an MLflow
    input) and its steps."""
    import mlflow

    mlflow.log_params({"config": config, "dataset": dataset, "dataset_version": version, "data_root": data_root,
                       "num_clips": len(manifest), "steps": ",".join(s.name for s in cfg.steps)})
    mlflow.log_dict(cfg.model_dump(mode="json"), "pipeline_config.json")
    with warnings.catch_warnings():  # MLflow registers the local source type twice, and hints that
        warnings.simplefilter("ignore", UserWarning)  # int columns cannot hold missing values (ours have none)
        inputs = mlflow.data.from_pandas(manifest.drop(columns=["clip_abspath"]), name=f"{dataset}@{version}",
                                         source=f"{data_root}/datasets/{dataset}", digest=version)
        mlflow.log_input(inputs, context="training")


def log_step_results(trained: list[dict], parent_run_id: str) -> None:
    """Each step's line, and its loss and speed as `<step>_*` metrics of the active (parent) run."""
    import mlflow

    for result in trained:
        # a cached step returns the result of the run that trained it, under another parent
        cached = result.get("parent_run_id") != parent_run_id
        loss = result["train_loss"]
        print(f"{result['step']}: step {result['global_step']}, "
              + ("trained before" if loss is None else f"loss {loss:.4f}")
              + (f" (unchanged: reused run {result['run_id']})" if cached else ""))
        if loss is not None:
            mlflow.log_metric(f"{result['step']}_train_loss", loss)
        if result.get("samples_per_s") is not None:  # (none in a result from before it was recorded)
            mlflow.log_metric(f"{result['step']}_samples_per_s", result["samples_per_s"])
        mlflow.set_tag(f"mav.step.{result['step']}.run", result["run_id"])


def _train_steps(cfg: PipelineConfig, dataset: str, data_root: str, version: str, tracking_uri: str,
                 parent_run_id: str, code: str) -> list[dict]:
    """Train the config's steps in order, each a cached task keyed by its inputs and its init step's key."""
    from mlflow import MlflowClient

    work, keys, checkpoints, results = Path(cfg.work_dir).resolve(), {}, {}, []
    client = MlflowClient(tracking_uri)
    # where results are recorded: a step trained for another folder, store or registry name is not reused
    where = f"{work}|{store_identity(tracking_uri, cfg.experiment)}|{cfg.registry.model_prefix}"
    for step in cfg.steps:
        key = step_key(step, version, keys.get(step.init_from), code, where)
        keys[step.name] = key
        out_dir = work / "stages" / step.name / key
        # a deleted checkpoint invalidates the cached result; a left-over one is resumed from
        has_checkpoint = (out_dir / "checkpoints" / "last.ckpt").exists()
        name = registered_name(step.name, cfg.registry.model_prefix)
        args = (step.name, step.stage, repo_path(step.config), step.overrides, data_root, dataset, version,
                checkpoints.get(step.init_from), str(out_dir), tracking_uri, cfg.experiment, parent_run_id, key, name)
        result = train_stage_task.with_options(refresh_cache=not has_checkpoint)(*args)
        registered = model_version(client, f"models:/{name}/{result['model_version']}")
        if registered is None or not run_is_there(client, registered.run_id):
            # a cached result whose version was deleted from the registry, or whose run was (the version's
            # source is that run's artifact): run again, it takes the finished checkpoint (no training)
            # and registers it anew
            result = train_stage_task.with_options(refresh_cache=True)(*args)
        checkpoints[step.name] = result["checkpoint"]
        results.append(result)
    return results


def _train_only(config: str, cfg: PipelineConfig, dataset: str, data_root: str, version: str | None,
                tracking_uri: str | None) -> dict:
    from data_prep.dataset import load_manifest

    check_places(cfg, data_root, ingests=False, evaluates=False)
    tracking_uri = tracking_uri or cfg.tracking_uri or default_tracking_uri()
    check_tracking(tracking_uri, cfg.experiment)  # (a server that is down: MLflow retried ~4 min, then a trace)
    data_root = str(Path(data_root).resolve())
    manifest = load_manifest(Path(data_root), dataset, version)
    version = manifest.attrs["version"]
    use_experiment(tracking_uri, cfg.experiment)
    end_orphaned_runs(tracking_uri, cfg.experiment)
    code = code_digest()
    tags = {"mav.kind": "train-only", "mav.dataset": dataset, "mav.dataset_version": version, "mav.code": code}
    with start_run(run_name=f"train {dataset}@{version}", tags=tags, log_system_metrics=True) as parent:
        log_training_inputs(config, cfg, dataset, version, data_root, manifest)  # as a pipeline run's
        results = _train_steps(cfg, dataset, data_root, version, tracking_uri, parent.info.run_id, code)
        log_step_results(results, parent.info.run_id)
    return {"version": version, "checkpoints": {r["step"]: r["checkpoint"] for r in results}}


def register(subparsers) -> None:
    parser = subparsers.add_parser("pipeline", help="end to end: ingest -> train all stages -> sample -> evaluate -> register")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"pipeline YAML (default {DEFAULT_CONFIG}: the CPU demo)")
    parser.add_argument("--dataset")
    parser.add_argument("--data-root")
    parser.add_argument("--version", help="use this dataset version instead of ingesting")
    parser.add_argument("--tracking-uri")
    parser.add_argument("--force", action="store_true", help="with --version: run even if it already has a finished run")
    parser.set_defaults(func=_run)


def check_places(cfg: PipelineConfig, data_root: str | None, ingests: bool, evaluates: bool = True) -> None:
    """Local sources, image-text folders and detector weights exist; the data root and work folder
    can be written; every CLIP the stages or CLIPSIM load is a folder or cached or reachable hub id
    (else the flow would fail after its ingest, train on the last version with the missing sources
    only logged, or fail at a later step or the evaluation, hours in)."""
    from eval.weights import is_url
    from models.config import load_config

    if ingests:
        from data_prep.config import load_ingest_config
        from data_prep.sources import holds_videos

        if not cfg.sources:  # it trained on the dataset's last version, saying nothing
            raise ValueError("sources: none given")
        local = [s for s in ingest_sources(cfg.sources) if "://" not in s]
        if missing := [s for s in local if not Path(s).exists()]:
            raise ValueError(f"sources: no such file or folder: {', '.join(missing)}")
        extensions = load_ingest_config(repo_path(cfg.ingest_config)).video_extensions
        root = Path(data_root or cfg.data_root)
        if empty := [s for s in local if Path(s).is_dir() and not holds_videos(Path(s), extensions, root)]:
            raise ValueError(f"sources: no video files in {', '.join(empty)} (by extension: the ingest config's "
                             "video_extensions)")
    clips = []  # (stage or None for the evaluation, CLIP name, the setting that names it)
    last = {}  # stage -> (step name, its config): the chain the pipeline samples from
    for step in cfg.steps:
        stage_config = load_config(repo_path(step.config), step.overrides)  # (loaded and checked once already)
        last[step.stage] = (step.name, stage_config)
        data = stage_config.data
        if data.source == "images" and data.image_path and not Path(data.image_path).expanduser().exists():
            raise ValueError(f"step {step.name}: data.image_path {data.image_path}: no such file or folder")
        clips.append((stage_config.stage, stage_config.clip, f"step {step.name}: clip"))
    weights = cfg.evaluate.i3d_weights
    if evaluates and "fvd" in cfg.evaluate.metrics and weights and not is_url(weights) \
            and not Path(weights).expanduser().is_file():
        raise ValueError(f"evaluate.i3d_weights {weights}: no such file")
    if evaluates and "clipsim" in cfg.evaluate.metrics and cfg.evaluate.clip_model is not None:
        clips.append((None, cfg.evaluate.clip_model, "evaluate.clip_model"))
    writable_folder(data_root or cfg.data_root, "data_root")
    writable_folder(cfg.work_dir, "work_dir")
    # a CLIP hub id that is neither cached nor reachable (an offline GPU host) failed the first stage
    # after the ingest, or the evaluation after all the training; a config read now, weights later
    from models.clip_source import CLIPLoadError, check_clip

    checked = set()
    for stage, name, where in clips:
        if name in checked or (stage and stage not in CLIP_STAGES):
            continue
        checked.add(name)
        try:
            check_clip(name)
        except CLIPLoadError as err:
            raise ValueError(f"{where}: {err}") from None
    if evaluates:
        check_chain(last, cfg.registry.model_prefix)


def check_chain(last: dict, prefix: str) -> None:
    """What sampling asks of the last step of each stage (models.sampling.load_chain), checked before
    the steps train: else the pipeline failed at its samples, after all the training."""
    for stage, (name, _) in last.items():
        model, wanted = registered_name(name, prefix), registered_name(stage, prefix)
        if model != wanted:  # (the pipeline itself samples from its own run's chain, whatever the names)
            warnings.warn(f"step {name}: the last {stage} step is registered as {model}, and `mav sample "
                          f"--registry` looks for {wanted}: name the step {stage!r} to sample the champion chain "
                          "from the registry", stacklevel=2)
    missing = [stage for stage in ("prior", "decoder") if stage not in last]
    if missing:
        raise ValueError(f"steps: the pipeline samples from a prior and a decoder step; there is no "
                         f"{' or '.join(missing)} step")
    name, decoder = last["decoder"]
    if not decoder.video:
        raise ValueError(f"step {name}: the last decoder step, which samples, is image-mode: add a video-mode "
                         f"decoder step after it (init_from: {name})")
    clips = {step: config.clip for stage, (step, config) in last.items() if stage in CLIP_STAGES}
    if len(set(clips.values())) > 1:
        raise ValueError(f"steps {', '.join(clips)}: trained with different CLIP models "
                         f"({', '.join(f'{step} {clip!r}' for step, clip in clips.items())}); the prior's embeddings "
                         "only mean something to stages trained with its CLIP")


def _run(args: argparse.Namespace) -> int:
    try:
        cfg = load_pipeline_config(args.config)  # bad input: one line, before a flow (and its logged trace) starts
        if args.force and not args.version:
            raise ValueError("--force goes with --version V (to run a version again); without it the pipeline "
                             "ingests and runs anyway")
        check_places(cfg, args.data_root, ingests=args.version is None)
        check_tracking(args.tracking_uri or cfg.tracking_uri or default_tracking_uri(), cfg.experiment)
        if args.version:
            from data_prep.dataset import load_manifest

            load_manifest(Path(args.data_root or cfg.data_root), args.dataset or cfg.dataset, args.version)
        summary = pipeline(config=args.config, dataset=args.dataset, data_root=args.data_root, version=args.version,
                           tracking_uri=args.tracking_uri, force=args.force)
    except (ValueError, FileNotFoundError) as err:  # bad input: a config, a dataset version, data (the flow logs the trace)
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if summary else 1
