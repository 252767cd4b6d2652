"""The `evaluate` flow: score fake videos against real ones (FVD) and prompts (CLIPSIM), log to MLflow.

    mav evaluate --real NAME[@VERSION] --fake runs:/<run_id> --metrics fvd,clipsim
    mav evaluate --protocol ucf101 --protocol-root UCF101_DIR --checkpoints CKPT_DIR   # FVD + IS
    mav evaluate --protocol msrvtt --captions test_videodatainfo.json --fake FOLDER    # CLIPSIM (+ FVD)

A source (SRC) is a dataset under --data-root (NAME or NAME@VERSION), a folder of
videos, or an MLflow run (`runs:/<run_id>[/path]` or `mlflow:<run_id>`) whose video
artifacts are used (flows/eval_sources.py). The flow can also make the fake videos itself with a sampler
(`models.sampling.sample_videos` by default when `checkpoints` are given). A protocol
(eval.protocols: UCF-101, MSR-VTT) supplies the prompts, the real videos and the metrics;
fake videos made elsewhere must carry its prompts (prompts.json: {file name: prompt}).
Without real weights (no --i3d-weights, CLIP not available locally) it runs on
random weights and every printed line and logged metric name says "smoke".
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE as NO_CACHE

from flows.cli import (device_name, non_negative_float, non_negative_int, positive_float, positive_int, with_notes,
                       writable_folder)
from flows.eval_sources import RUN_SOURCE, VideoSet, not_in_store, read_prompts, resolve_source
from flows.registry import add_registry_options, chain_from_registry, describe
from flows.tracking import (default_tracking_uri, end_orphaned_runs, experiment_id, heartbeat, process_tags,
                            release_interrupted_frames, stopped)
from eval import METRICS, metric_list
from eval.protocols import PAPER_CHAIN, PROTOCOLS, check_protocol_inputs, load_protocol, protocol_metrics
from eval.video_io import list_videos, write_png

RESIZE = "bilinear 224x224 align_corners=False, no crop, [-1,1]"
DEFAULT_METRICS = "fvd,clipsim"  # without --metrics or a protocol


# -- tasks ---------------------------------------------------------------------------
@task(name="sample-videos", cache_policy=NO_CACHE)
def sample_videos(prompts: list[str], sampler: Callable | None, checkpoints, out_dir: str, steps: int | None,
                  guidance: float | None, seed: int, device: str) -> VideoSet:
    from models.sampling import sample_videos as sample_batches
    from models.sampling import update_sidecar

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if sampler is None:  # the sampling chain, loaded once, in batches
        made = sample_batches(prompts, checkpoints, out, steps=steps, guidance=guidance, seed=seed, device=device,
                              gif=False)
        paths = [Path(r.mp4) for r in made]
    else:
        paths = []
        for i, prompt in enumerate(prompts):
            target = out / f"sample-{i:05d}.mp4"
            made = sampler(prompt, checkpoints, target, steps=steps, guidance=guidance, seed=seed + i, device=device)
            paths.append(Path(made) if isinstance(made, (str, Path)) else target)
        update_sidecar(out / "prompts.json", {p.name: q for p, q in zip(paths, prompts)})
        update_sidecar(out / "samples.json", {p.name: {"prompt": q, "seed": seed + i}
                                              for i, (p, q) in enumerate(zip(paths, prompts))})
    return VideoSet(str(out), "sampled", paths, list(prompts))


def load_clip_for_eval(clip_model: str | None, device: str, log=print):
    """CLIP for CLIPSIM. None = the default ViT-B/32 if it is available locally, else a tiny
    random CLIP (smoke); "tiny" = the tiny random CLIP; anything else must load."""
    from models.clip import DEFAULT_CLIP, FrozenCLIP, tiny_clip_path

    if clip_model not in (None, "tiny"):
        return FrozenCLIP.load(clip_model, device=device)
    if clip_model is None:
        try:  # from the local cache only: no silent download (nor minutes of retries offline)
            return FrozenCLIP.load(DEFAULT_CLIP, device=device, local_only=True)
        except Exception as err:  # not cached: OSError / hub errors
            log(f"CLIP {DEFAULT_CLIP} is not in the local Hugging Face cache ({type(err).__name__}); CLIPSIM "
                "runs in SMOKE mode on a tiny random CLIP. Pass --clip PATH (or the hub id, to download it) "
                "for real numbers.")
    return FrozenCLIP.load(tiny_clip_path(), device=device)


@task(name="score", cache_policy=NO_CACHE)
def score_task(metrics: list[str], real: VideoSet | None, fake: VideoSet, prompts: list[str] | None,
               clip_length: int, clip_stride: int, seed: int, device: str, batch_size: int, *,
               i3d_weights: str | None = None, i3d_sha256: str | None = None, clip_model: str | None = None,
               c3d_weights: str | None = None, c3d_sha256: str | None = None, num_resamples: int = 100,
               unbiased: bool = False, fps: float | None = None) -> tuple[dict, list, dict]:
    """-> ({metric: result}, the first 16 fake clips for the pictures, the C3D's params for IS).
    The fake videos are decoded once for every metric; the real ones (FVD) with one random
    offset per video, as StyleGAN-V does (a dataset's clips from the keyframe before it), the fake
    ones from their first frame; with `fps`, the clips of both come from the videos resampled to it
    (CLIPSIM still scores every fake frame)."""
    from eval.compute import ClipSpec, score_files

    fvd = clipsim = inception = None
    extra = {}
    if "fvd" in metrics:
        from eval.fvd import FrechetVideoDistance
        from eval.i3d import load_i3d

        detector = load_i3d(i3d_weights, sha256=i3d_sha256, device=device, batch_size=batch_size,
                            amp_dtype=None, channels_last=device.startswith("cuda"))
        fvd = FrechetVideoDistance(detector, unbiased=unbiased, clip_stride=clip_stride, clip_fps=fps).to(device)
    if "clipsim" in metrics:
        from eval.clipsim import CLIPSIM

        clipsim = CLIPSIM(load_clip_for_eval(clip_model, device, get_run_logger().warning)).to(device)
    if "is" in metrics:
        from eval.inception_score import VideoInceptionScore, load_c3d
        from eval.protocols import UCF101Settings

        c3d, smoke, extra["c3d_sha256"] = load_c3d(c3d_weights, c3d_sha256, device=device, seed=seed)
        extra |= {"is_classifier": f"C3D ({c3d.kind})", "is_frame_size": c3d.frame_size}
        inception = VideoInceptionScore(c3d, smoke, splits=UCF101Settings.is_splits).to(device)
    clips: list = []
    score_files(fake.paths, ClipSpec(clip_length, clip_stride, fps=fps), fvd=fvd, real=real.paths if real else (),
                real_spec=ClipSpec(clip_length, clip_stride, random_offset=True, seed=seed, fps=fps,
                                   from_keyframe=real is not None and real.kind == "dataset"), clipsim=clipsim,
                prompts=prompts, inception=inception, batch_size=batch_size, keep_clips=clips)
    results = {}
    if fvd is not None:
        results["fvd"] = fvd.result(num_resamples=num_resamples)
    if clipsim is not None:
        results["clipsim"] = clipsim.result(num_resamples=num_resamples * 10)
    if inception is not None:
        results["is"] = inception.result()
    return results, clips, extra


def result_lines(results: dict) -> list[str]:
    lines = []
    for name, r in results.items():
        interval = f" [{r.low:.4g}, {r.high:.4g}]" if getattr(r, "low", None) is not None else ""
        spread = f" ± {r.std:.3g}" if getattr(r, "std", None) is not None else ""
        smoke = " (smoke)" if r.smoke else ""
        n = f"N={r.num_real}+{r.num_fake}" if name == "fvd" else f"N={r.num_videos}"
        lines.append(f"{name}: {r.value:.4g}{spread}{interval}{smoke}  ({n})")
    return lines


def metric_values(results: dict) -> dict[str, float]:
    """MLflow metric names and values of the results: smoke numbers get their own names (smoke_fvd),
    so they can never be mistaken for real ones; intervals as <name>_low/_high, a spread as _std."""
    out = {}
    for name, r in results.items():
        key = f"smoke_{name}" if r.smoke else name
        out[key] = r.value
        if getattr(r, "low", None) is not None:
            out |= {f"{key}_low": r.low, f"{key}_high": r.high}
        if getattr(r, "std", None) is not None:
            out[f"{key}_std"] = r.std
    return out


@contextlib.contextmanager
def evaluation_run(tracking_uri: str, experiment: str, parent_run_id: str | None, run_name: str | None):
    """The evaluation's MLflow run (nested under parent_run_id if given), RUNNING from the flow's start, so
    hours of sampling and scoring show in the UI and a failed or stopped evaluation is in the store
    too (FAILED or KILLED, its error in the `mav.error` tag). -> its run id. Uses MlflowClient, not the
    fluent API, so a caller's active run (e.g. the pipeline's parent run) is left alone."""
    from mlflow import MlflowClient
    from mlflow.tracking.context.registry import resolve_tags

    client = MlflowClient(tracking_uri)
    exp_id = experiment_id(tracking_uri, experiment)
    if not parent_run_id:  # (a pipeline ended its experiment's as it started)
        end_orphaned_runs(tracking_uri, experiment, say=lambda line: print(line, file=sys.stderr))
    tags = {"mav.kind": "evaluate"} | process_tags()
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    # the user, source and git commit that mlflow.start_run gives every training and pipeline run: the
    # client's create_run adds none, and an FVD could not be told from one of other code
    run_id = client.create_run(exp_id, run_name=run_name, tags=resolve_tags(tags)).info.run_id
    try:
        with heartbeat(tracking_uri, run_id):
            yield run_id
    except BaseException as err:
        if stopped(err):  # one landing in a store query holds its lock until freed
            release_interrupted_frames(err)
        else:
            try:
                client.set_tag(run_id, "mav.error", with_notes(err)[:5000])
            except Exception:  # the store itself failed: the status below says enough
                pass
        client.set_terminated(run_id, "KILLED" if stopped(err) else "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


@task(name="log-to-mlflow", cache_policy=NO_CACHE)
def log_task(run_id: str, results: dict, params: dict, clips: list, tracking_uri: str, prompts: dict | None = None,
             samples: VideoSet | None = None) -> None:
    """The results, params and pictures of the evaluation run `run_id`. `samples`, the videos this
    evaluation sampled, go to samples/ with their prompts.json (and samples.json: each one's seed),
    where `--fake runs:/<id>` finds them."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    from eval.sheets import contact_sheet, video_grid
    from models.video_io import write_gif, write_mp4  # torch: imported when logging, not with the CLI

    client = MlflowClient(tracking_uri)
    now = int(time.time() * 1000)
    metrics = [Metric(key, value, now, 0) for key, value in metric_values(results).items()]
    client.log_batch(run_id, metrics=metrics,
                     params=[Param(k, str(v if v is not None else "none")) for k, v in params.items()],
                     tags=[RunTag("mav.smoke", str(any(r.smoke for r in results.values())).lower())])
    client.log_dict(run_id, {k: r.as_dict() for k, r in results.items()}, "eval/results.json")
    if prompts:
        client.log_dict(run_id, prompts, "eval/prompts.json")
    if samples:
        for path in samples.paths:
            client.log_artifact(run_id, str(path), "samples")
        client.log_dict(run_id, {p.name: q for p, q in zip(samples.paths, samples.prompts)}, "samples/prompts.json")
        if (Path(samples.source) / "samples.json").is_file():  # each video's seed and settings
            client.log_artifact(run_id, str(Path(samples.source) / "samples.json"), "samples")
    if clips:
        with tempfile.TemporaryDirectory() as tmp:
            grid = video_grid(clips)
            write_mp4(grid, Path(tmp) / "grid.mp4", fps=8)
            write_gif(grid, Path(tmp) / "grid.gif", fps=8)
            write_png(Path(tmp) / "contact_sheet.png", contact_sheet(clips))
            client.log_artifacts(run_id, tmp, "eval")


def check_inputs(args: argparse.Namespace) -> None:
    """What can be checked before the flow starts (its failures log a whole trace first):
    metrics, the prompts file, video sources (folders, datasets, MLflow runs), weights and CLIP."""
    if args.protocol:
        check_protocol_inputs(args.protocol, args.protocol_root, args.captions)
    # what will be scored (a protocol without --metrics: its own)
    metrics = metric_list(args.metrics) if args.metrics is not None else \
        list(protocol_metrics(args.protocol, args.video_root)) if args.protocol else metric_list(DEFAULT_METRICS)
    if not (args.fake or args.checkpoints or args.registry):  # a protocol gives the prompts, not the videos
        raise ValueError(f"the {args.protocol} protocol scores fake videos: give --fake SRC, or --checkpoints DIR or "
                         "--registry ALIAS to sample them for its prompts" if args.protocol else
                         "give --fake SRC, or --checkpoints DIR or --registry ALIAS (and --prompts) to sample the "
                         "fake videos")
    if sum(map(bool, (args.fake, args.checkpoints, args.registry))) > 1:
        raise ValueError("give one of --fake, --checkpoints and --registry")
    if (args.checkpoints or args.registry) and not (args.prompts or args.protocol):
        raise ValueError("sampling the fake videos (--checkpoints, --registry) needs --prompts FILE")
    if args.sample_dir:
        if not (args.checkpoints or args.registry):
            raise ValueError("--sample-dir is where videos sampled from --checkpoints or --registry go; it needs one "
                             "of them")
        if Path(args.sample_dir).is_dir() and list_videos(Path(args.sample_dir)):  # an earlier run's, kept
            raise ValueError(f"--sample-dir {args.sample_dir}: holds videos already; name a new or empty folder")
        writable_folder(args.sample_dir, "--sample-dir")
    given_prompts = None
    if args.prompts and not (args.fake and not RUN_SOURCE.match(args.fake)):
        given_prompts = read_prompts(args.prompts)  # with a local --fake: below, against its videos
    if "fvd" in metrics:
        from eval.i3d import MIN_FRAMES  # (torch: this command imports it anyway)

        if args.clip_length < MIN_FRAMES:
            raise ValueError(f"--clip-length {args.clip_length} is below {MIN_FRAMES}, the shortest clip I3D takes")
    if "is" in metrics and args.clip_length != 16:
        raise ValueError(f"--clip-length {args.clip_length}: the inception score's C3D takes 16-frame clips")
    if args.registry:  # what the flow will sample from: each version there, and its checkpoint file
        chain_from_registry(args.tracking_uri or default_tracking_uri(), args.registry, args.model_prefix)
    local = {}  # real / fake: the sources read from folders and datasets here
    for side, src in (("real", args.real), ("fake", args.fake)):
        if src and RUN_SOURCE.match(src):  # the run must exist; its artifacts are fetched in the flow
            import mlflow
            from mlflow.exceptions import MlflowException

            tracking_uri = args.tracking_uri or default_tracking_uri()
            try:
                mlflow.MlflowClient(tracking_uri).get_run(RUN_SOURCE.match(src).group(1))
            except MlflowException as err:
                raise not_in_store(src, tracking_uri, err) from None
        elif src:
            videos = resolve_source(src, args.data_root)
            local[side] = videos
            if side == "real":
                continue
            if args.prompts:
                videos.prompts = read_prompts(args.prompts, videos.paths)
            if args.protocol:
                videos.require_prompts(f"the {args.protocol} protocol")
            elif "clipsim" in metrics:
                videos.require_prompts("clipsim")
    if "fvd" in metrics and not (args.real or args.protocol):
        raise ValueError("fvd needs --real SRC (a dataset NAME[@VERSION], a folder or runs:/<id>)")
    if {"fvd", "is"} & set(metrics):
        check_video_counts(args, local, given_prompts, metrics)
    if {"fvd", "is"} & set(metrics):
        for videos in local.values():
            check_clip_lengths(videos.take(args.num_videos, args.seed), args.clip_length, args.clip_stride,
                               args.fps)
    elif "fake" in local:  # CLIPSIM alone: each video's header is read, so one that is no video is named now
        from eval.video_io import count_frames

        for path in local["fake"].take(args.num_videos, args.seed).paths:
            count_frames(path, decode=False)
    check_models(args, metrics)


def check_video_counts(args: argparse.Namespace, local: dict[str, VideoSet], prompts: list[str] | None,
                       metrics: list[str]) -> None:
    """FVD's covariances need 2 videos a side, IS 2 fake ones: counted here, as the flow will take them
    (it found out after sampling). An MLflow run's videos are counted in the flow, once fetched."""
    n, proto = args.num_videos, None
    if args.protocol:  # its prompts, real videos and N
        proto = load_protocol(args.protocol, root=args.protocol_root, split_file=args.split_file,
                              captions=args.captions, video_root=args.video_root, num_videos=n, seed=args.seed)
        n = proto.num_videos
    counts = {}  # side -> (videos there, what they are)
    if "fake" in local:
        counts["fake"] = (len(local["fake"].paths), "video", f"in {args.fake}")
    elif not args.fake and prompts is not None:  # one video sampled a prompt
        counts["fake"] = (len(prompts), "prompt", f"in {args.prompts}")
    elif not args.fake and proto:
        counts["fake"] = (len(proto.prompts), "prompt", f"of the {proto.name} protocol")
    if proto and proto.real:
        counts["real"] = (len(proto.real), "video", f"in {proto.real_source}")
    elif "real" in local:
        counts["real"] = (len(local["real"].paths), "video", f"in {args.real}")
    for side, (count, noun, where) in counts.items():
        scored = min(count, n or count)
        metric = "fvd" if "fvd" in metrics else "is" if side == "fake" else None
        if metric and scored < 2:
            cap = f", --num-videos {n}" if n and n <= count else ""
            raise ValueError(f"{metric} needs at least 2 {side} videos, got {scored} ({count} {noun}"
                             f"{'s' * (count != 1)} {where}{cap})")


def check_models(args: argparse.Namespace, metrics: list[str]) -> None:
    """The weights and CLIP the metrics load, as their loaders check them: else a missing or wrong file
    was found in the flow, after sampling the videos, behind its traces."""
    if "fvd" in metrics and args.i3d_weights:
        from eval.i3d import read_i3d_weights

        read_i3d_weights(args.i3d_weights, args.i3d_sha256)
    if "is" in metrics and args.c3d_weights:
        from eval.inception_score import read_c3d_weights

        read_c3d_weights(args.c3d_weights, args.c3d_sha256)
    if "clipsim" in metrics and args.clip_model is not None:  # None: the default, else smoke
        from models.clip_source import check_clip

        check_clip(args.clip_model)


def check_clip_lengths(videos: VideoSet, length: int, stride: int, fps: float | None = None) -> None:
    """A video too short for one clip, named before any decoding (where its container says how
    long it is; the others are found as they are read). With fps, in frames of the video resampled to it."""
    from eval.video_io import count_frames

    span = (length - 1) * stride + 1
    at, option = (f" at {fps:g} fps", f", --fps {fps:g}") if fps is not None else ("", "")
    for path in videos.paths:
        frames = count_frames(path, decode=False, fps=fps)
        if frames is not None and frames < span:
            raise ValueError(f"{path}: {frames} frames{at}, shorter than one clip (--clip-length {length}, "
                             f"--clip-stride {stride}{option}: {span} frames)")


# -- the flow -------------------------------------------------------------------------
@flow(name="evaluate")
def evaluate(real: str | None = None, fake: str | None = None, prompts: str | None = None,
             metrics: str | list[str] | None = None, num_videos: int | None = None, i3d_weights: str | None = None,
             i3d_sha256: str | None = None, clip_model: str | None = None, data_root: str = "mav-data",
             tracking_uri: str | None = None, clip_length: int = 16, clip_stride: int = 1, fps: float | None = None,
             seed: int = 0, device: str = "auto", num_resamples: int = 100, unbiased: bool = False,
             batch_size: int = 16,
             sampler: Callable | None = None, checkpoints=None, registry: str | None = None, model_prefix: str = "mav",
             sample_dir: str | None = None,
             sample_steps: int | None = None, guidance: float | None = None, experiment: str = "evaluate",
             parent_run_id: str | None = None, run_name: str | None = None, protocol: str | None = None,
             protocol_root: str | None = None, split_file: str | None = None, captions: str | None = None,
             video_root: str | None = None, c3d_weights: str | None = None, c3d_sha256: str | None = None) -> dict:
    """Score `fake` (or videos sampled for `prompts` from `checkpoints`, or from the registered models
    `<model_prefix>-<stage>` at the alias `registry`) against `real`; or run a
    `protocol` (ucf101: protocol_root, split_file; msrvtt: captions, video_root), which gives the
    prompts, the real videos and the metrics (fvd + is; clipsim [+ fvd]) and N (2048; all captions).
    `fps`: FVD and IS clips come from the videos resampled to it (None: each at its own rate).
    Returns {"results": {metric: dict}, "lines": [...], "prompts": {file: prompt}, "run_id": ...}."""
    import torch

    tracking_uri = tracking_uri or default_tracking_uri()
    with evaluation_run(tracking_uri, experiment, parent_run_id, run_name) as run_id:
        proto = None
        if protocol:
            proto = load_protocol(protocol, root=protocol_root, split_file=split_file, captions=captions,
                                  video_root=video_root, num_videos=num_videos, seed=seed)
            num_videos = proto.num_videos
            if real and proto.real:
                raise ValueError(f"the {protocol} protocol names the real videos itself; drop --real")
        metrics = metric_list(metrics if metrics is not None else proto.metrics if proto else DEFAULT_METRICS)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"

        fake_set = resolve_source(fake, data_root, tracking_uri) if fake else None
        versions = None
        if registry:
            checkpoints, versions = chain_from_registry(tracking_uri, registry, model_prefix)
            get_run_logger().info(f"sampling from the registry's {registry!r} versions: {describe(versions)}")
        sampled = own_dir = None
        prompt_list = None
        if prompts:
            prompt_list = read_prompts(prompts, fake_set.paths if fake_set else None)
        if fake_set is None:
            if sampler is None and checkpoints is None:
                raise ValueError("give --fake SRC, or checkpoints (and prompts) to sample fake videos from")
            prompt_list = prompt_list or (proto.prompts if proto else None)
            if not prompt_list:
                raise ValueError("sampling fake videos needs prompts")
            prompt_list = prompt_list[:num_videos] if num_videos else prompt_list
            if proto and isinstance(checkpoints, dict):  # the videos the paper scores: 16x256x256
                checkpoints = paper_chain(checkpoints, proto.name)
                versions = versions and {stage: v for stage, v in versions.items() if stage in checkpoints}
            own_dir = None if sample_dir else tempfile.mkdtemp(prefix="mav-samples-")
            try:
                sampled = fake_set = sample_videos(prompt_list, sampler, checkpoints, sample_dir or own_dir,
                                                   sample_steps, guidance, seed, device)
            except BaseException:
                if own_dir:  # a part of the samples is of no use: sampling starts over
                    shutil.rmtree(own_dir, ignore_errors=True)
                raise
            get_run_logger().info(f"sampled {len(sampled.paths)} videos into {sampled.source}")
        try:
            if prompt_list is not None:
                fake_set.prompts = prompt_list
            fake_set = fake_set.take(num_videos, seed)
            if proto:
                fake_set.require_prompts(f"the {proto.name} protocol")
                proto.check_prompts(fake_set.prompts, fake_set.source)

            params = {"metrics": ",".join(metrics), "fake_source": fake_set.source, "fake_kind": fake_set.kind,
                      "num_fake": len(fake_set.paths), "clip_length": clip_length, "clip_stride": clip_stride,
                      "clip_fps": "native" if fps is None else fps, "seed": seed, "device": device}
            if proto:
                params |= {"protocol": proto.name} | proto.params
            if sampled:
                chain = checkpoints if isinstance(checkpoints, dict) else None
                params |= sampling_params(sample_steps, guidance, chain)
                if versions:
                    params |= {"registry_alias": registry, "model_versions": describe(versions)}
                if own_dir:  # removed once logged
                    params["fake_source"] = "this run's samples/ artifacts"
            elif recorded := fake_set.extra.get("sampled_with"):  # sampled before: mav sample, a pipeline run's samples
                params |= sampling_params(recorded.get("steps"), recorded.get("guidance"),
                                          {stage: c["path"] for stage, c in (recorded.get("checkpoints") or {}).items()
                                           if isinstance(c, dict) and c.get("path")})
            real_set = None
            if "fvd" in metrics:
                if proto and proto.real:
                    real_set = VideoSet(proto.real_source, proto.name, proto.real)
                elif real:
                    real_set = resolve_source(real, data_root, tracking_uri)
                else:
                    raise ValueError("fvd needs --real SRC" + (" or --video-root" if protocol == "msrvtt" else ""))
                real_set = real_set.take(num_videos, seed)
            if "clipsim" in metrics:
                fake_set.require_prompts("clipsim")
            if {"fvd", "is"} & set(metrics):  # MLflow runs' videos, sampled ones, the pipeline's: not checked before
                for videos in (real_set, fake_set):
                    if videos is not None:
                        check_clip_lengths(videos, clip_length, clip_stride, fps)
            results, clips, extra = score_task(metrics, real_set, fake_set, fake_set.prompts, clip_length, clip_stride,
                                               seed, device, batch_size, i3d_weights=i3d_weights, i3d_sha256=i3d_sha256,
                                               clip_model=clip_model, c3d_weights=c3d_weights, c3d_sha256=c3d_sha256,
                                               num_resamples=num_resamples, unbiased=unbiased, fps=fps)
            if "fvd" in results:
                r = results["fvd"]
                params |= {"real_source": real_set.source, "real_version": real_set.version, "num_real": r.num_real,
                           "resize": RESIZE, "covariance": "unbiased" if unbiased else "biased",
                           "real_offset": "one random offset per video", "detector": r.detector,
                           "detector_sha256": r.detector_sha256, "fvd_smoke": r.smoke,
                           "bootstrap_resamples": num_resamples}
            if "clipsim" in results:
                params |= {"clip_model": results["clipsim"].clip_model, "clipsim_smoke": results["clipsim"].smoke}
            if "is" in results:
                params |= {"is_classifier": extra["is_classifier"], "c3d_sha256": extra["c3d_sha256"],
                           "is_splits": results["is"].splits, "is_frame_size": extra["is_frame_size"],
                           "is_smoke": results["is"].smoke}
            params["smoke"] = any(r.smoke for r in results.values())
            used = {p.name: q for p, q in zip(fake_set.paths, fake_set.prompts)} if fake_set.prompts else None
            log_task(run_id, results, params, clips, tracking_uri, used, sampled)
        except BaseException as err:
            if own_dir and Path(own_dir).is_dir():  # hours of sampling: kept, and the error says where
                err.add_note(f"the sampled videos are kept in {own_dir}")
            raise
    if own_dir:  # logged with the run
        shutil.rmtree(own_dir, ignore_errors=True)
    lines = result_lines(results)
    logger = get_run_logger()
    for line in lines:
        logger.info(line)
    return {"results": {k: r.as_dict() for k, r in results.items()}, "metrics": metric_values(results),
            "lines": lines, "prompts": used, "run_id": run_id, "tracking_uri": tracking_uri}


def paper_chain(checkpoints: dict, protocol: str) -> dict:
    """The stages of `checkpoints` a protocol samples with (PAPER_CHAIN), said in the run's log."""
    kept = {stage: path for stage, path in checkpoints.items() if stage in PAPER_CHAIN}
    if left := [stage for stage in checkpoints if stage not in kept]:
        get_run_logger().info(f"the {protocol} protocol scores 16-frame 256 px videos, as the paper does: "
                              f"sampling without {', '.join(left)}")
    if "sr_low" not in kept:
        get_run_logger().warning(f"no sr_low checkpoint: the {protocol} videos are sampled at the decoder's size, "
                                 "not the paper's 256 px")
    return kept


def sampling_params(steps: int | None, guidance: float | None, checkpoints: dict | None) -> dict:
    """How the fake videos were sampled, under the same names whether this run sampled them or a folder's
    or run's samples.json says (the pipeline's evaluate step): else its runs showed no sampler settings."""
    params = {"sample_steps": "per stage config" if steps is None else steps,
              "guidance": "per stage config" if guidance is None else guidance}
    if checkpoints:  # resolved: the pipeline's links move to each new chain
        params["checkpoints"] = ",".join(f"{stage}={Path(path).resolve()}" for stage, path in checkpoints.items())
    return params


# -- CLI ---------------------------------------------------------------------------------
def register(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="FVD / CLIPSIM / IS of fake videos against real ones, or a benchmark "
                                               "protocol (UCF-101, MSR-VTT), logged to MLflow")
    p.add_argument("--real", help="dataset NAME[@VERSION], folder of videos, or runs:/<run_id> / mlflow:<run_id>")
    p.add_argument("--fake", help="same forms as --real")
    p.add_argument("--checkpoints", help="instead of --fake: sample from <stage>.ckpt or <stage>/checkpoints/last.ckpt "
                                         "in this folder")
    add_registry_options(p, instead_of="--fake")
    p.add_argument("--sample-dir", help="with --checkpoints or --registry: keep the sampled videos (and prompts.json) "
                                        "here; they are logged to the run's samples/ either way")
    p.add_argument("--prompts", help="prompts of the fake videos: .txt (one per line) or .json (list or {file: prompt})")
    p.add_argument("--metrics", default=None, help=f"comma-separated, of {', '.join(METRICS)} "
                                                   "(default fvd,clipsim, or the protocol's)")
    p.add_argument("--num-videos", type=positive_int, default=None,
                   help="videos per set (seeded random subset; protocols: 2048 for ucf101, all captions for msrvtt)")
    p.add_argument("--protocol", choices=PROTOCOLS,
                   help="ucf101: class-template prompts, FVD + IS against --protocol-root; "
                        "msrvtt: one video per --captions caption, CLIPSIM (+ FVD with --video-root)")
    p.add_argument("--protocol-root", help="ucf101: folder with UCF-101/ and ucfTrainTestlist/")
    p.add_argument("--split-file", help="ucf101: split list in ucfTrainTestlist/ or a path (default trainlist01.txt)")
    p.add_argument("--captions", help="msrvtt: test_videodatainfo.json")
    p.add_argument("--video-root", help="msrvtt: folder of the test videos (<video_id>.mp4), for FVD")
    p.add_argument("--i3d-weights", default=None, help="i3d_pretrained_400.pt or i3d_torchscript.pt, path or URL; "
                                                       "without it FVD runs in smoke mode")
    p.add_argument("--i3d-sha256", default=None)
    p.add_argument("--c3d-weights", default=None, help="C3D state dict (UCF-101 classes) for IS, path or URL; "
                                                       "without it IS runs in smoke mode")
    p.add_argument("--c3d-sha256", default=None)
    p.add_argument("--clip", dest="clip_model", default=None,
                   help="CLIP hub id or folder (default openai/clip-vit-base-patch32 if cached, else smoke); 'tiny'")
    p.add_argument("--data-root", default="mav-data")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--clip-length", type=positive_int, default=16)
    p.add_argument("--clip-stride", type=positive_int, default=1)
    p.add_argument("--fps", type=positive_float, default=None,
                   help="resample every video in time to this rate before its clip is taken (sampled videos are "
                        "at the sampling fps x the interpolation skip, real ones at their own rate); "
                        "default: frames as decoded, as the reference implementations")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--device", type=device_name, default="auto")
    p.add_argument("--bootstrap", type=non_negative_int, default=100, help="bootstrap resamples for the FVD interval (0: none)")
    p.add_argument("--unbiased", action="store_true", help="unbiased covariance (default: biased, as StyleGAN-V)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--sample-steps", type=positive_int, default=None,
                   help="when sampling: sampler steps per stage (default: each stage config's sample_steps)")
    p.add_argument("--guidance", type=non_negative_float, default=None,
                   help="when sampling: classifier-free guidance (default: each stage config's guidance)")
    p.add_argument("--experiment", default="evaluate")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from flows.train import find_checkpoints

    try:
        check_inputs(args)
        checkpoints = None
        if args.checkpoints:  # the chain needs both: one missing was found in the flow, behind its trace
            checkpoints = find_checkpoints(Path(args.checkpoints), {})
            if missing := [stage for stage in ("prior", "decoder") if stage not in checkpoints]:
                raise FileNotFoundError(f"{args.checkpoints}: no {' or '.join(missing)} checkpoint (as <stage>.ckpt "
                                        "or <stage>/checkpoints/last.ckpt)")
        out = evaluate(real=args.real, fake=args.fake, prompts=args.prompts, metrics=args.metrics,
                       num_videos=args.num_videos, i3d_weights=args.i3d_weights, i3d_sha256=args.i3d_sha256,
                       clip_model=args.clip_model, data_root=args.data_root, tracking_uri=args.tracking_uri,
                       clip_length=args.clip_length, clip_stride=args.clip_stride, fps=args.fps, seed=args.seed,
                       device=args.device,
                       num_resamples=args.bootstrap, unbiased=args.unbiased, batch_size=args.batch_size,
                       experiment=args.experiment, checkpoints=checkpoints, registry=args.registry,
                       model_prefix=args.model_prefix, sample_steps=args.sample_steps,
                       guidance=args.guidance, sample_dir=args.sample_dir, protocol=args.protocol,
                       protocol_root=args.protocol_root, split_file=args.split_file, captions=args.captions,
                       video_root=args.video_root, c3d_weights=args.c3d_weights, c3d_sha256=args.c3d_sha256)
    except (ValueError, FileNotFoundError, ConnectionError) as err:  # ConnectionError: weights behind a URL
        print(f"error: {with_notes(err)}", file=sys.stderr)
        return 2
    for line in out["lines"]:
        print(line)
    print(f"mlflow run: {out['run_id']} ({out['tracking_uri']})", file=sys.stderr)
    return 0
