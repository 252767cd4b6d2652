"""Typed settings of the end-to-end pipeline (configs/<size>/pipeline.yaml)."""
from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from data_prep.config import describe, read_yaml_mapping
from eval import metric_list
from models.compat import scratch_problem
from models.config import STAGES, load_config

REPO = Path(__file__).resolve().parent.parent
STEP_NAME = re.compile(r"\w[\w.\- ]*")  # what MLflow takes in metric names, tag keys and model names
# MLflow's rules for a registered model's alias ("latest" and v1, V2... are its own) and name; broken,
# they failed at registration, after the training (the alias: after the whole run)
ALIAS = re.compile(r"[\w-]+")
RESERVED_ALIAS = re.compile(r"latest|[vV]\d+")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainStep(Strict):
    name: str  # unique step name, e.g. decoder_image
    stage: str  # prior | decoder | interpolation | sr_low | sr_high
    config: str  # configs/<size>/<stage>.yaml
    overrides: dict = {}  # dotted keys, e.g. {mode: image}
    init_from: str | None = None  # an earlier step whose checkpoint initialises this one


class SampleSettings(Strict):
    prompts: list[str] = Field(["a bunny in a meadow", "bottles on a table", "a person signing a word",
                                "clouds over a field"], min_length=1)  # none: nothing to evaluate, after the training
    steps: int | None = Field(None, ge=1)  # None: each stage config's sample_steps
    guidance: float | None = Field(None, ge=0)
    seed: int = 0


class EvaluateSettings(Strict):
    metrics: list[str] = ["fvd", "clipsim"]
    num_videos: int | None = Field(None, ge=1)  # None: every real clip and every sample (N may differ)
    clip_length: int = Field(16, ge=1)
    fps: float | None = Field(None, gt=0)  # FVD clips of the videos resampled to it; None: each at its own rate
    i3d_weights: str | None = None  # without: FVD in smoke mode (random I3D), said in every value
    i3d_sha256: str | None = None
    clip_model: str | None = None  # hub id or folder; None: evaluate's default
    num_resamples: int = Field(100, ge=0)


class RegisterSettings(Strict):
    model_prefix: str = "mav"
    alias: str = "champion"


class PipelineConfig(Strict):
    sources: list[str] = ["data/samples"]
    data_root: str = "mav-data"
    dataset: str = "samples"
    ingest_config: str | None = "configs/tiny/ingest.yaml"
    work_dir: str = "mav-runs"
    tracking_uri: str | None = None  # None: sqlite:///<cwd>/mlflow.db
    experiment: str = "mav-pipeline"
    min_new_clips: int = Field(1, ge=0)  # retraining threshold for dataset events
    steps: list[TrainStep] = Field(default_factory=list)
    sample: SampleSettings = Field(default_factory=SampleSettings)
    evaluate: EvaluateSettings = Field(default_factory=EvaluateSettings)
    registry: RegisterSettings = Field(default_factory=RegisterSettings)


def repo_path(path: str | None) -> str | None:
    """A path as given if it exists, else relative to the repository (configs/..., data/samples)."""
    if path is None:
        return None
    return path if Path(path).exists() else str(REPO / path)


def load_pipeline_config(path: str | Path) -> PipelineConfig:
    """The pipeline config, with every step's stage config loaded (with its overrides) up front:
    a typo in the last step fails before the ingest and the other steps run, not hours later."""
    given, path = Path(path), Path(repo_path(str(path)))
    raw = read_yaml_mapping(path if path.is_file() else given, "pipeline config")  # a missing one: as typed
    try:
        config = PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ValueError(f"pipeline config {path}: {describe(err)}") from None
    try:
        config.evaluate.metrics = metric_list(config.evaluate.metrics)
    except ValueError as err:
        raise ValueError(f"pipeline config {path}: evaluate.metrics: {err}") from None
    if "fvd" in config.evaluate.metrics and min(len(config.sample.prompts), config.evaluate.num_videos or 2) < 2:
        raise ValueError(f"pipeline config {path}: FVD needs at least 2 sampled videos (sample.prompts has "
                         f"{len(config.sample.prompts)}, evaluate.num_videos is {config.evaluate.num_videos}); "
                         "add prompts or drop fvd from evaluate.metrics")
    names = [s.name for s in config.steps]
    if len(set(names)) != len(names):
        raise ValueError(f"pipeline config {path}: step names repeat")
    check_registry(f"pipeline config {path}", config.registry, names)
    stage_configs = {}
    for step in config.steps:
        where = f"pipeline config {path}: step {step.name}"
        if not STEP_NAME.fullmatch(step.name):  # it names a folder, an MLflow metric, tag and registered model
            raise ValueError(f"{where}: a step name holds letters, digits, _ - . and spaces, and starts with a "
                             "letter or digit")
        if step.init_from and step.init_from not in names[: names.index(step.name)]:
            raise ValueError(f"{where}: init_from {step.init_from!r} is not an earlier step")
        if step.stage not in STAGES:
            raise ValueError(f"{where}: unknown stage {step.stage!r}; stages are {', '.join(STAGES)}")
        try:
            stage_config = load_config(repo_path(step.config), step.overrides)
        except ValueError as err:  # ConfigError: a missing file, bad YAML, a wrong key or value
            raise ValueError(f"{where}: {err}") from None
        if stage_config.stage != step.stage:
            raise ValueError(f"{where}: {step.config} is a {stage_config.stage!r} config, the step is {step.stage!r}")
        if step.init_from:
            check_init(where, step, stage_configs[step.init_from], stage_config)
        elif problem := scratch_problem(stage_config):  # else it failed after the earlier steps trained
            raise ValueError(f"{where}: {problem}")
        stage_configs[step.name] = stage_config
    return config


def check_registry(where: str, registry: RegisterSettings, names: list[str]) -> None:
    """The alias and each step's registered model name, as MLflow will take them."""
    from flows.registry import registered_name

    if not ALIAS.fullmatch(registry.alias) or RESERVED_ALIAS.fullmatch(registry.alias):
        raise ValueError(f"{where}: registry.alias {registry.alias!r}: letters, digits, _ and -, and not latest, "
                         "v1, V2... (MLflow's own)")
    if not registry.model_prefix or any(c in registry.model_prefix for c in "/:'\""):  # (quotes: MLflow filters)
        raise ValueError(f"{where}: registry.model_prefix {registry.model_prefix!r}: not empty, without / : or quotes")
    models: dict[str, str] = {}
    for name in names:  # registered_name folds _ into -: sr_low and sr-low were one model
        if (other := models.setdefault(registered_name(name, registry.model_prefix), name)) != name:
            raise ValueError(f"{where}: steps {other} and {name} are both registered as "
                             f"{registered_name(name, registry.model_prefix)}; rename one")


def check_init(where: str, step: TrainStep, source, stage_config) -> None:
    """The rules the step's start from the init step's checkpoint applies (models.compat), checked on
    their configs now: else the step failed as it started, after every earlier step had trained."""
    from models.compat import init_problem

    if problem := init_problem(source.model_dump(mode="json"), stage_config, "step", (step.init_from, step.name)):
        raise ValueError(f"{where}: init_from {step.init_from!r}: {problem}")
