"""prefect.yaml end to end on real services: Prefect server + process worker + MLflow server on loopback.

One test, in the order a user meets it:
  1. `prefect --no-prompt deploy --all` creates every deployment in prefect.yaml (and the
     retraining automation); the ingest cron schedule exists (paused here so that an hour
     boundary during the test cannot start an ingest of data/samples).
  2. Running the `ingest` deployment on a folder with two videos makes dataset version v1
     and emits `mav.dataset.updated`; the deployment trigger starts `pipeline/pipeline`
     with parameters from the event payload (new_clips arrives as an int).
  3. That pipeline run trains and logs one MLflow parent run tagged mav.dataset_version=v1
     into the MLflow server it was told to use (the deployment's tracking_uri parameter).
  4. The same event emitted again by hand starts a second pipeline run, which does not train:
     still exactly one parent run for v1.
  5. A second video + ingest -> v2 -> a second event-triggered pipeline run for v2 (the
     deployment's min_new_clips is raised first, so it stops at the threshold and the test
     trains only once).
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.servers import REPO, mlflow_tracking_server, prefect_stack, run_cli, tool  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.server, pytest.mark.slow, pytest.mark.timeout(1200)]

SAMPLES = REPO / "data" / "samples"
EVENT = "mav.dataset.updated"
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
DATASET = "deploytest"


# -- helpers ------------------------------------------------------------------------------
def entrypoint_exists(entrypoint: str) -> bool:
    """Does `path.py:function` name a function defined in the file (no import: cheap and side-effect free)?"""
    import ast

    path, _, name = entrypoint.partition(":")
    file = REPO / path
    if not file.is_file():
        return False
    tree = ast.parse(file.read_text())
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name for n in tree.body)


class Api:
    """The Prefect sync client pointed at the test server (settings only inside each call)."""

    def __init__(self, api_url: str):
        self.api_url = api_url

    def __call__(self, fn):
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: self.api_url}):
            with get_client(sync_client=True) as client:
                return fn(client)

    def deployment(self, name: str):
        return self(lambda c: c.read_deployment_by_name(name))

    def runs_of(self, deployment_id) -> list:
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
        from prefect.client.schemas.sorting import FlowRunSort

        return self(lambda c: c.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            sort=FlowRunSort.START_TIME_ASC, limit=100))

    def flow_run(self, run_id):
        return self(lambda c: c.read_flow_run(run_id))


def wait_for(what: str, probe, timeout: float, stack, interval: float = 0.5):
    """Call probe() until it returns something truthy; on timeout fail with the worker's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n--- worker log\n{stack.worker.log_tail(120)}"
                f"\n--- server log\n{stack.server.log_tail(40)}")


def wait_final(api: Api, run_id, timeout: float, stack):
    def probe():
        run = api.flow_run(run_id)
        return run if run.state and run.state.type.value in FINAL else None

    run = wait_for(f"flow run {run_id} to finish", probe, timeout, stack)
    if run.state.type.value != "COMPLETED":
        pytest.fail(f"flow run {run.name} ended {run.state.type.value}: {run.state.message}\n"
                    f"--- worker log\n{stack.worker.log_tail(150)}")
    return run


def pipeline_runs_for(api: Api, deployment_id, version: str) -> list:
    return [r for r in api.runs_of(deployment_id) if (r.parameters or {}).get("version") == version]


def mlflow_parent_runs(tracking_uri: str, version: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiments = client.search_experiments()
    if not experiments:
        return []
    return client.search_runs([e.experiment_id for e in experiments],
                              filter_string=f"tags.`mav.dataset_version` = '{version}' and tags.`mav.kind` = 'pipeline'",
                              max_results=100)


def emit_dataset_event(env: dict, payload: dict) -> None:
    """Emit mav.dataset.updated against the test server from a separate process (as ingest does)."""
    code = (
        "import json, sys\n"
        "from prefect.events import emit_event\n"
        "from prefect.events.worker import EventsWorker\n"
        "p = json.loads(sys.argv[1])\n"
        "e = emit_event(event='mav.dataset.updated', payload=p,\n"
        "               resource={'prefect.resource.id': 'mav.dataset.' + p['dataset'],\n"
        "                         'prefect.resource.name': p['dataset']})\n"
        "assert e is not None, 'event not emitted (no PREFECT_API_URL?)'\n"
        "EventsWorker.drain_all()\n"
        "print(e.id)\n"
    )
    run_cli([sys.executable, "-c", code, json.dumps(payload)], env, timeout=120)


def run_ingest(api: Api, stack, folder: Path, data_root: Path) -> dict:
    """Run the ingest deployment on `folder` through the worker; return the new dataset version's payload."""
    dep = api.deployment("ingest/ingest")
    run = api(lambda c: c.create_flow_run_from_deployment(
        dep.id, parameters={"sources": [str(folder)], "data_root": str(data_root), "dataset": DATASET,
                            "config": "configs/tiny/ingest.yaml"}))
    wait_final(api, run.id, 300, stack)
    latest = data_root / "datasets" / DATASET / "latest"
    version = latest.read_text().strip() if latest.is_file() else latest.resolve().name
    return {"version": version, "run": run}


def quick_pipeline_config(tmp_path: Path) -> Path:
    """configs/tiny/pipeline.yaml cut down for a test: the steps up to the video decoder (the shortest
    chain that samples; test_pipeline trains the whole one), 2 optimizer steps each, 2 prompts, 2
    sampler steps, few bootstrap resamples, work files under tmp_path."""
    cfg = yaml.safe_load((REPO / "configs" / "tiny" / "pipeline.yaml").read_text())
    cfg["steps"] = [step for step in cfg["steps"] if step["name"] in ("prior", "decoder_image", "decoder")]
    assert len(cfg["steps"]) == 3, "configs/tiny/pipeline.yaml renamed its steps"
    for step in cfg["steps"]:
        step["config"] = str(REPO / step["config"])
        step["overrides"] = {**step.get("overrides", {}), "trainer.max_steps": 2, "trainer.warmup_steps": 1}
    cfg["sample"] = {**cfg.get("sample", {}), "prompts": cfg.get("sample", {}).get("prompts", ["a", "b"])[:2], "steps": 2}
    cfg["evaluate"] = {**cfg.get("evaluate", {}), "num_resamples": 10}
    cfg["work_dir"] = str(tmp_path / "mav-runs")
    cfg["ingest_config"] = str(REPO / cfg["ingest_config"]) if cfg.get("ingest_config") else None
    path = tmp_path / "pipeline-quick.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# -- the test --------------------------------------------------------------------------------
def test_deploy_ingest_triggers_pipeline(prefect_stack, mlflow_tracking_server, tmp_path):
    stack, api = prefect_stack, Api(prefect_stack.api_url)
    timings: dict[str, float] = {}
    t0 = time.monotonic()

    # 1. deploy ---------------------------------------------------------------------------
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    names = [d["name"] for d in spec["deployments"]]
    assert {"ingest", "train", "evaluate", "pipeline"} <= set(names)
    assert spec["pull"] == []
    assert [d["name"] for d in spec["deployments"] if not entrypoint_exists(d["entrypoint"])] == []
    out = run_cli([tool("prefect"), "--no-prompt", "deploy", "--all"], stack.env, timeout=600)
    timings["deploy"] = time.monotonic() - t0
    listed = api(lambda c: c.read_deployments())
    listed_names = {dep.name for dep in listed}
    assert set(names) <= listed_names, (listed_names, out.stdout[-3000:])
    for dep in listed:
        assert dep.work_pool_name == "mav-process"
        assert dep.pull_steps in ([], None), dep.pull_steps

    ingest_dep = api.deployment("ingest/ingest")
    schedules = api(lambda c: c.read_deployment_schedules(ingest_dep.id))
    assert schedules and schedules[0].schedule.cron, schedules
    for s in schedules:  # no surprise ingest of data/samples if the test crosses an hour boundary
        api(lambda c, s=s: c.update_deployment_schedule(ingest_dep.id, s.id, active=False))

    pipeline_dep = api.deployment("pipeline/pipeline")
    automations = api(lambda c: c.read_automations())
    retrain = [a for a in automations if EVENT in json.dumps(a.trigger.model_dump(mode="json"))]
    assert retrain, [a.name for a in automations]

    # the pipeline logs into the MLflow server we started
    from prefect.client.schemas.actions import DeploymentUpdate

    def set_pipeline_params(**params):
        merged = {**(api.deployment("pipeline/pipeline").parameters or {}), **params}
        api(lambda c: c.update_deployment(pipeline_dep.id, DeploymentUpdate(parameters=merged)))

    tracking_uri = mlflow_tracking_server.url
    config = quick_pipeline_config(tmp_path)
    set_pipeline_params(tracking_uri=tracking_uri, min_new_clips=1, config=str(config))

    # 2. ingest two videos -> v1 -> event -> pipeline run ------------------------------------------
    # (asl_book gives 1 clip with the tiny ingest config; FVD needs >= 2 real clips: add bigbuckbunny's 2)
    videos, data_root = tmp_path / "videos", tmp_path / "data"
    videos.mkdir()
    for name in ("asl_book.mkv", "bigbuckbunny.mp4"):
        shutil.copy(SAMPLES / name, videos / name)
    t = time.monotonic()
    v1 = run_ingest(api, stack, videos, data_root)["version"]
    timings["ingest 1"] = time.monotonic() - t
    assert v1

    run_a = wait_for(f"a pipeline run for {v1}", lambda: pipeline_runs_for(api, pipeline_dep.id, v1), 120, stack)[0]
    params = run_a.parameters
    assert params["dataset"] == DATASET and params["version"] == v1
    assert Path(params["data_root"]) == data_root.resolve()
    from data_prep.dataset import load_manifest

    clips_v1 = len(load_manifest(data_root, DATASET, v1))
    assert isinstance(params["new_clips"], int) and params["new_clips"] == clips_v1, params  # tojson keeps the int
    assert params["tracking_uri"] == tracking_uri and params["min_new_clips"] == 1
    print("parameters of the event-triggered pipeline run:", {k: (v, type(v).__name__) for k, v in params.items()})

    # 4 (early). the same event again while run A is still going: the deployment's concurrency
    # limit queues run B behind A, and B then finds A's MLflow run and does not train.
    emit_dataset_event(stack.env, {"dataset": DATASET, "data_root": str(data_root.resolve()), "version": v1,
                                   "parent": None, "new_clips": params["new_clips"], "total_clips": params["new_clips"]})

    t = time.monotonic()
    wait_final(api, run_a.id, 480, stack)
    timings["pipeline (trains)"] = time.monotonic() - t
    parents = mlflow_parent_runs(tracking_uri, v1)
    assert len(parents) == 1, [r.info.run_id for r in parents]
    assert parents[0].info.status == "FINISHED"

    runs_v1 = wait_for(f"the duplicate event's pipeline run for {v1}",
                       lambda: (lambda rs: rs if len(rs) >= 2 else None)(pipeline_runs_for(api, pipeline_dep.id, v1)),
                       120, stack)
    t = time.monotonic()
    for r in runs_v1:
        wait_final(api, r.id, 300, stack)
    timings["pipeline (duplicate, skips)"] = time.monotonic() - t
    assert len(pipeline_runs_for(api, pipeline_dep.id, v1)) == 2
    assert len(mlflow_parent_runs(tracking_uri, v1)) == 1, "the same dataset version was trained twice"

    # 5. second video -> v2 -> second triggered run (threshold raised: it must not train) ---------
    set_pipeline_params(min_new_clips=1_000_000)
    shutil.copy(SAMPLES / "bottle-detection.mp4", videos / "bottle-detection.mp4")
    t = time.monotonic()
    v2 = run_ingest(api, stack, videos, data_root)["version"]
    timings["ingest 2"] = time.monotonic() - t
    assert v2 and v2 != v1
    run_c = wait_for(f"a pipeline run for {v2}", lambda: pipeline_runs_for(api, pipeline_dep.id, v2), 120, stack)[0]
    added = len(load_manifest(data_root, DATASET, v2)) - clips_v1  # v2 only adds bottle-detection's clips
    assert added >= 1 and run_c.parameters["new_clips"] == added
    assert run_c.parameters["min_new_clips"] == 1_000_000
    t = time.monotonic()
    wait_final(api, run_c.id, 300, stack)
    timings["pipeline (below threshold)"] = time.monotonic() - t
    assert mlflow_parent_runs(tracking_uri, v2) == []
    timings["total"] = time.monotonic() - t0
    print("timings (s):", {k: round(v, 1) for k, v in timings.items()})
