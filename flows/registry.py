"""The MLflow model registry: each pipeline step's checkpoint is a version of `<prefix>-<step>`,
the alias `champion` follows the best FVD, and `mav sample` / `mav evaluate --registry ALIAS`
take the sampling chain back out of it.

A registered version's source is its training run's checkpoint artifact. A local store's
file is used where it lies; a remote store's (an `mlflow server`) is downloaded once into
$MAV_CACHE/registry (default ~/.cache/mav), checked against the sha256 recorded at registration.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
import urllib.parse
from pathlib import Path

CHAIN = ("prior", "decoder", "interpolation", "sr_low", "sr_high")


class RegistryError(ValueError):
    pass


def registered_name(step_name: str, prefix: str = "mav") -> str:
    return f"{prefix}-{step_name.replace('_', '-')}"


def register_checkpoint(client, run_id: str, source: str, name: str, step_name: str, cache_key: str,
                        sha256: str | None = None) -> str:
    """A version of `name` whose source is `source` (a run artifact), new unless the same checkpoint
    (`sha256`) of the same step (`cache_key`) has one; returns its number."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description=f"Make-A-Video step {step_name} (a Lightning checkpoint)")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":  # (a name MLflow refuses was swallowed here)
            raise
    if sha256:  # the same checkpoint of the same step registered before (a rerun whose Prefect results
        # were not kept: another host, a new PREFECT_HOME): that version, while its run is there
        for known in client.search_model_versions(f"name = '{name}'"):
            if known.tags.get("mav.sha256") == sha256 and known.tags.get("mav.cache_key") == cache_key \
                    and run_is_there(client, known.run_id):
                return known.version
    tags = {"mav.cache_key": cache_key} | ({"mav.sha256": sha256} if sha256 else {})
    return client.create_model_version(name, source, run_id=run_id, tags=tags).version


def run_is_there(client, run_id: str | None) -> bool:
    """Whether a run exists and is not deleted (a version of a deleted run has no source to load)."""
    from mlflow.exceptions import MlflowException

    try:
        return bool(run_id) and client.get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False


def move_champion(client, trained: list[dict], metric: str, value: float, alias: str, prefix: str, log,
                  settings: str) -> list[str]:
    """Tag each of this run's model versions with the best `metric` of any sampling chain it was
    part of (a version reused from an earlier run keeps its better score: a worse chain around it
    says nothing against it), and point `alias` at those whose best beats the champion's. Scores
    are compared only under the same evaluation `settings` (an FVD of 16 real clips, or at another
    clip length or fps, is another number than one of 2048): a champion scored under others stays."""
    moved = []
    for item in trained:
        name = registered_name(item["step"], prefix)
        version = item["model_version"]
        own = score(client.get_model_version(name, version).tags, metric, settings)
        best_here = value if own is None else min(value, own)
        client.set_model_version_tag(name, version, f"mav.{metric}", str(best_here))
        client.set_model_version_tag(name, version, f"mav.{metric}_settings", settings)
        champion = aliased(client, name, alias)
        if champion is not None and champion.version == version:
            continue
        real = f"mav.{metric.removeprefix('smoke_')}"
        if champion is not None and metric.startswith("smoke_") and real in champion.tags:
            # a random-weight score says nothing against one of real weights (and a real one beats
            # a smoke-scored champion: its smoke tag is not read above)
            log.info("%s: a %s does not displace a champion scored with %s", name, metric, real.removeprefix("mav."))
            continue
        best = float("inf")  # no champion, or one without this metric
        if champion is not None and f"mav.{metric}" in champion.tags:
            best = score(champion.tags, metric, settings)
            if best is None:
                log.info("%s: the %s v%s was scored under other evaluation settings (%s; this run: %s); alias "
                         "stays", name, alias, champion.version, champion.tags.get(f"mav.{metric}_settings"), settings)
                continue
        if best_here < best:
            client.set_registered_model_alias(name, alias, version)
            moved.append(f"{name} v{version}")
        else:
            log.info("%s: %s %.4g does not beat the champion's %.4g; alias stays", name, metric, best_here, best)
    return moved


def aliased(client, name: str, alias: str):
    """The version `alias` points at, None if the model has no such alias. Any other store error is
    raised: read as "no champion", it would hand the alias to whatever this run trained."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        # (an alias the model lacks is INVALID_PARAMETER_VALUE, a model the store lacks RESOURCE_DOES_NOT_EXIST)
        if err.error_code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):
            return None
        raise


def score(tags: dict, metric: str, settings: str) -> float | None:
    """A version's recorded `metric` if it was scored under these settings (or before they were
    recorded), else None."""
    value = tags.get(f"mav.{metric}")
    if value is None or tags.get(f"mav.{metric}_settings", settings) != settings:
        return None
    return float(value)


MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))")


def model_version(client, uri: str):
    """The version a model URI names (`models:/NAME@ALIAS`, `models:/NAME/VERSION`), None if there is none."""
    from mlflow.exceptions import MlflowException

    match = MODEL_URI.fullmatch(uri)
    if not match:
        raise RegistryError(f"{uri}: not a model URI (models:/NAME@ALIAS or models:/NAME/VERSION)")
    name, alias, number = match.group("name", "alias", "version")
    try:
        if alias:  # (an unknown alias is INVALID_PARAMETER_VALUE to get_model_version_by_alias, like a bad name)
            number = client.get_registered_model(name).aliases.get(alias)
            if number is None:
                return None
        return client.get_model_version(name, str(number))
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":  # no such model or version
            return None
        raise RegistryError(f"{uri}: {err.message}") from None


def checkpoints_from_registry(tracking_uri: str, uris: dict[str, str],
                              optional=()) -> tuple[dict[str, Path], dict[str, str]]:
    """The checkpoint each `{stage: model URI}` names, and `{stage: "<name>/<version>"}`. A URI that
    names no version is an error, except for the `optional` stages, which are left out."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    checkpoints, versions = {}, {}
    for stage, uri in uris.items():
        version = model_version(client, uri)
        if version is None and stage in optional:
            continue
        if version is None:
            raise RegistryError(f"registry {tracking_uri}: {uri} names no model version (a pipeline run registers "
                                "<prefix>-<step> for each step, and moves 'champion' once it has an FVD)")
        checkpoints[stage] = fetch_version(version, tracking_uri)
        versions[stage] = f"{version.name}/{version.version}"
    return checkpoints, versions


def chain_from_registry(tracking_uri: str, alias: str, prefix: str = "mav",
                        skip=()) -> tuple[dict[str, Path], dict[str, str]]:
    """Each chain stage's model `<prefix>-<stage>` at `alias` (the pipelines name each stage's last
    step after the stage), but the stages in `skip`; only the prior and the decoder must have one."""
    uris = {stage: f"models:/{registered_name(stage, prefix)}@{alias}" for stage in CHAIN if stage not in skip}
    return checkpoints_from_registry(tracking_uri, uris, optional=[s for s in uris if s not in ("prior", "decoder")])


def fetch_version(version, tracking_uri: str) -> Path:
    """A local path of the version's checkpoint: the store's own file, or a verified cached download."""
    import mlflow

    label = f"{version.name} v{version.version}"
    source = urllib.parse.urlparse(version.source)
    if source.scheme in ("", "file"):
        path = Path(urllib.parse.unquote(source.path))
        if not path.is_file():
            raise RegistryError(f"{label}: its checkpoint {version.source} is gone")
        return path
    # versions do not change: downloaded once, keyed by the store and the version's source
    key = hashlib.sha256(f"{tracking_uri}|{version.source}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("MAV_CACHE", Path.home() / ".cache" / "mav")) / "registry"
    target = cache / version.name / key / Path(source.path).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".tmp-") as tmp:  # whole and verified, or not at all
        try:
            got = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=tmp,
                                                           tracking_uri=tracking_uri))
        except Exception as err:  # MLflow raises its own and the HTTP client's errors
            raise RegistryError(f"{label}: downloading {version.source} failed ({err})") from None
        from data_prep.download import sha256_file

        expected = version.tags.get("mav.sha256")
        if expected and sha256_file(got) != expected:
            raise RegistryError(f"{label}: the downloaded checkpoint's sha256 is not the {expected} recorded "
                                "at registration (corrupt or replaced)")
        os.replace(got, target)
    return target


def add_registry_options(parser, instead_of: str) -> None:
    """`--registry ALIAS` and `--model-prefix`, for the commands that sample a chain."""
    parser.add_argument("--registry", metavar="ALIAS",
                        help=f"instead of {instead_of}: sample from each stage's registered model <prefix>-<stage> "
                             "at this alias in the MLflow registry (e.g. champion)")
    parser.add_argument("--model-prefix", default="mav", help="with --registry: the pipeline's registry.model_prefix")


def describe(versions: dict[str, str]) -> str:
    return ", ".join(f"{stage}={ref}" for stage, ref in versions.items())

