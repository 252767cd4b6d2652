"""Checkpoints out of the MLflow model registry, from a local store and through a real `mlflow server`."""
import hashlib
import os
import re
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows.registry import RegistryError, checkpoints_from_registry, register_checkpoint, registered_name
from flows.tracking import experiment_id
from tests.servers import mlflow_server


def register(uri: str, stage: str, data: bytes, tmp_path: Path, alias: str | None = "champion") -> Path:
    """Log `data` as a run's checkpoint artifact, as the pipeline does, and register it."""
    client = MlflowClient(uri)
    run = client.create_run(experiment_id(uri, "reg"))  # (a SQLite store's artifacts beside it)
    local = tmp_path / "upload" / run.info.run_id / "last.ckpt"
    local.parent.mkdir(parents=True)
    local.write_bytes(data)
    client.log_artifact(run.info.run_id, str(local), "checkpoints")
    client.set_terminated(run.info.run_id)
    name = registered_name(stage)
    version = register_checkpoint(client, run.info.run_id, f"{run.info.artifact_uri}/checkpoints/last.ckpt", name,
                                  stage, "key", hashlib.sha256(data).hexdigest())
    if alias:
        client.set_registered_model_alias(name, alias, version)
    return local


@pytest.mark.server
def test_a_remote_stores_checkpoint_is_downloaded_once_and_verified(tmp_path, monkeypatch):
    """Through `mlflow server` (artifacts proxied over HTTP): the checkpoint comes down whole into
    $MAV_CACHE and is taken from there next time; bytes changed on the server since registration
    are refused, and nothing of them is cached."""
    monkeypatch.setenv("MAV_CACHE", str(tmp_path / "cache"))
    with mlflow_server(tmp_path / "server") as server:
        data = os.urandom(300_000)
        register(server.url, "prior", data, tmp_path)
        register(server.url, "decoder", os.urandom(1000), tmp_path)
        uris = {"prior": "models:/mav-prior@champion", "decoder": "models:/mav-decoder/1"}
        found, versions = checkpoints_from_registry(server.url, uris)
        assert versions == {"prior": "mav-prior/1", "decoder": "mav-decoder/1"}
        assert found["prior"].read_bytes() == data and found["prior"].is_relative_to(tmp_path / "cache")
        stored = list((tmp_path / "server" / "artifacts").rglob("last.ckpt"))
        assert len(stored) == 2
        for path in stored:  # the server's copies gone: the cache still answers
            path.unlink()
        assert checkpoints_from_registry(server.url, uris)[0] == found

        monkeypatch.setenv("MAV_CACHE", str(tmp_path / "fresh-cache"))
        tampered = bytearray(data)
        tampered[1000] ^= 1
        for path in stored:
            path.write_bytes(bytes(tampered))
        with pytest.raises(RegistryError, match=r"mav-prior v1: the downloaded checkpoint's sha256 is not the "
                                                r"[0-9a-f]{64} recorded at registration"):
            checkpoints_from_registry(server.url, uris)
        assert [p for p in (tmp_path / "fresh-cache").rglob("*") if p.is_file()] == []


def test_registry_errors_name_the_model_and_the_reason(tmp_path, capsys):
    from flows.cli import main

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    local = register(uri, "prior", b"prior bytes", tmp_path)
    register(uri, "decoder", b"decoder bytes", tmp_path, alias=None)  # registered, no champion
    found, _ = checkpoints_from_registry(uri, {"prior": "models:/mav-prior@champion"})
    assert found["prior"].read_bytes() == b"prior bytes" and found["prior"].is_relative_to(tmp_path / "mlartifacts")

    cases = [(["--registry", "champion"], r"models:/mav-decoder@champion names no model version"),
             (["--registry", "champion", "--model-prefix", "team"], r"models:/team-prior@champion names no model"),
             (["--prior", "models:/mav-prior", "--decoder", "x.ckpt"], r"models:/mav-prior: not a model URI"),
             (["--prior", "models:/mav-prior/7", "--decoder", "x.ckpt"], r"models:/mav-prior/7 names no model"),
             (["--registry", "champion", "--checkpoints", str(tmp_path)], r"--checkpoints DIR or --registry ALIAS")]
    for args, message in cases:
        assert main(["sample", "--prompt", "x", "--tracking-uri", uri, "--out", str(tmp_path / "v.mp4"), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]  # (before it, MLflow may log its store's set-up)
        assert err.startswith("error: ") and re.search(message, err), err

    artifact = found["prior"]  # the store's own file, read in place
    assert artifact.read_bytes() == b"prior bytes" and local.read_bytes() == b"prior bytes"
    artifact.unlink()  # the store's file deleted by hand
    with pytest.raises(RegistryError, match=r"mav-prior v1: its checkpoint file://\S+last.ckpt is gone"):
        checkpoints_from_registry(uri, {"prior": "models:/mav-prior@champion"})
    assert not (tmp_path / "v.mp4").exists()


def test_the_same_checkpoint_registered_again_is_the_same_version(tmp_path):
    """A rerun whose Prefect results were not kept (another host, a new PREFECT_HOME) trains nothing
    but registered every step again: a version per rerun of the same bytes. The same checkpoint of the
    same step is its version; other bytes, another step's key, or a version whose run was deleted
    make a new one."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)

    def version(data: bytes, key: str = "key") -> int:
        run = client.create_run(experiment_id(uri, "reg"))
        client.set_terminated(run.info.run_id)
        return register_checkpoint(client, run.info.run_id, f"{run.info.artifact_uri}/last.ckpt", "mav-prior",
                                   "prior", key, hashlib.sha256(data).hexdigest())

    assert [version(b"one"), version(b"one"), version(b"two"), version(b"one", "other key")] == [1, 1, 2, 3]
    client.delete_run(client.get_model_version("mav-prior", "1").run_id)
    assert version(b"one") == 4
