"""Typed settings of the end-to-end pipeline (configs/<size>/pipeline.yaml)."""
from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from data_prep.config import describe


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainStep(Strict):
    name: str  # unique step name, e.g. decoder_image
    stage: str  # prior | decoder | interpolation | sr_low | sr_high
    config: str  # configs/<size>/<stage>.yaml
    overrides: dict = {}  # dotted keys, e.g. {mode: image}
    init_from: str | None = None  # an earlier step whose checkpoint initialises this one


class SampleSettings(Strict):
    prompts: list[str] = ["a bunny in a meadow", "bottles on a table", "a person signing a word", "clouds over a field"]
    steps: int | None = None  # None: each stage config's sample_steps
    guidance: float | None = None
    seed: int = 0


class EvaluateSettings(Strict):
    metrics: list[str] = ["fvd", "clipsim"]
    num_videos: int | None = None  # None: every real clip and every sample (N may differ between them)
    clip_length: int = 16
    i3d_weights: str | None = None  # without: FVD in smoke mode (random I3D), said in every value
    i3d_sha256: str | None = None
    clip_model: str | None = None  # hub id or folder; None: evaluate's default
    num_resamples: int = 100


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
    min_new_clips: int = 1  # retraining threshold for dataset events
    steps: list[TrainStep] = Field(default_factory=list)
    sample: SampleSettings = Field(default_factory=SampleSettings)
    evaluate: EvaluateSettings = Field(default_factory=EvaluateSettings)
    registry: RegisterSettings = Field(default_factory=RegisterSettings)


def load_pipeline_config(path: str | Path) -> PipelineConfig:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"pipeline config {path}: no such file")
    try:
        config = PipelineConfig.model_validate(yaml.safe_load(path.read_text()) or {})
    except ValidationError as err:
        raise ValueError(f"pipeline config {path}: {describe(err)}") from None
    names = [s.name for s in config.steps]
    for step in config.steps:
        if step.init_from and step.init_from not in names[: names.index(step.name)]:
            raise ValueError(f"pipeline config {path}: step {step.name}: init_from {step.init_from!r} is not an earlier step")
    if len(set(names)) != len(names):
        raise ValueError(f"pipeline config {path}: step names repeat")
    return config
