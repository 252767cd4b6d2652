"""The MLflow UI (a React app served by `mlflow server`) shows pipeline runs with FVD and CLIPSIM.

The last test runs a real (fast) pipeline and opens the UI over its store; the others log
two runs named like the pipeline's with chosen values, to check the compare and chart views.

Starts a real `mlflow server` on loopback over a fresh SQLite store, logs two parent runs the
way the pipeline names them (`pipeline DATASET@VERSION`, tags mav.kind / mav.dataset_version,
metrics fvd and clipsim) and renders pages in headless Chromium (`--dump-dom` after the
app has run, `--screenshot`). Needs /usr/bin/chromium (Debian package `chromium`); skipped
without it. Set MAV_UI_SCREENSHOT=docs/mlflow-ui.png to refresh the README's screenshot.

MLflow 3.17 pages used (hash routes):
  #/experiments/<id>/runs                      runs table (metric columns are hidden by default)
  #/experiments/<id>/runs?compareRunsMode=CHART  one bar chart per metric, one bar per run
  #/compare-runs?runs=[...]&experiments=[...]    side-by-side metrics/params table (text)
  #/experiments/<id>/runs/<run_id>             one run: its metrics table
"""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.servers import REPO, mlflow_tracking_server  # noqa: F401 (fixture)

pytestmark = [pytest.mark.server, pytest.mark.slow]

CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "", shutil.which("chromium-browser") or "")
                 if p and Path(p).exists()), None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars"]
RUNS = [  # (dataset version, fvd, clipsim): an older and a newer pipeline run to compare
    ("3f9c0a1b2c3d4e5f", 1873.25, 0.2011),
    ("a4b5c6d7e8f90112", 1412.50, 0.2387),
]


def chromium(args: list[str], profile: Path, budget_ms: int = 15000, timeout: float = 120) -> str:
    """Run headless Chromium once; return stdout (the DOM for --dump-dom)."""
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited {done.returncode}: {done.stderr[-3000:]}")
    return done.stdout


def visible_text(dom: str) -> str:
    text = re.sub(r"<script.*?</script>|<style.*?</style>", " ", dom, flags=re.S)
    text = re.sub(r"<[^>]+>", " ", text)
    return re.sub(r"\s+", " ", html.unescape(text))


def rendered_text(args: list[str], profile: Path, ready: str) -> str:
    """The page's visible text (--dump-dom), dumped once more with three times the virtual-time budget
    where the `ready` pattern is not in it yet: on a busy machine (the other test process beside it)
    the app has drawn some of its views, not all, within the first budget."""
    text = visible_text(chromium([*args, "--dump-dom"], profile))
    if not re.search(ready, text):
        text = visible_text(chromium([*args, "--dump-dom"], profile, budget_ms=45000))
    return text


def log_pipeline_runs(tracking_uri: str) -> tuple[str, list[str]]:
    """Parent runs named and tagged like flows/pipeline.py's, each with fvd and clipsim."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment_id = client.create_experiment("mav-pipeline")
    ids = []
    for version, fvd, clipsim in RUNS:
        run = client.create_run(experiment_id, run_name=f"pipeline uitest@{version}",
                                tags={"mav.kind": "pipeline", "mav.dataset": "uitest", "mav.dataset_version": version})
        client.log_param(run.info.run_id, "dataset_version", version)
        client.log_metric(run.info.run_id, "fvd", fvd)
        client.log_metric(run.info.run_id, "clipsim", clipsim)
        client.set_terminated(run.info.run_id)
        ids.append(run.info.run_id)
    return experiment_id, ids


@pytest.fixture(scope="module")
def ui(mlflow_tracking_server):
    if CHROMIUM is None:
        pytest.skip("headless Chromium not found (/usr/bin/chromium): apt-get install -y chromium")
    experiment_id, run_ids = log_pipeline_runs(mlflow_tracking_server.url)
    return mlflow_tracking_server.url, experiment_id, run_ids


def test_experiment_page_lists_the_runs(ui, tmp_path):
    url, experiment_id, run_ids = ui
    text = rendered_text([f"{url}/#/experiments/{experiment_id}/runs"], tmp_path / "profile", "matching runs")
    assert "mav-pipeline" in text, text[:2000]
    for version, _, _ in RUNS:
        assert f"pipeline uitest@{version}" in text, text[:3000]
    assert "2 matching runs" in text, text[:3000]


def test_compare_page_shows_fvd_and_clipsim(ui, tmp_path):
    url, experiment_id, run_ids = ui
    page = (f"{url}/#/compare-runs?runs={quote(json.dumps(run_ids))}"
            f"&experiments={quote(json.dumps([experiment_id]))}")
    # a tall window: the metrics table is virtualised and renders only the columns in view
    text = rendered_text(["--window-size=1600,1400", page], tmp_path / "profile", r"Metrics Show diff only clipsim fvd")
    assert "Comparing 2 Runs" in text, text[:3000]
    for version, _, _ in RUNS:
        assert f"pipeline uitest@{version}" in text
    # the metrics table: metric names (sorted), then per metric one rounded value per run
    table = re.search(r"Metrics Show diff only clipsim fvd ((?:[-\d.]+ ){4})", text)
    assert table, text[text.find("Metrics Show"):][:500]
    values = [float(v) for v in table.group(1).split()]
    expected = [r[2] for r in RUNS] + [r[1] for r in RUNS]
    # the UI rounds (3 decimals, 5 significant digits): 0.2387 -> 0.239, 1873.25 -> 1873.3
    assert all(abs(v - e) <= max(5e-4, 1e-4 * abs(e)) for v, e in zip(values, expected)), (values, expected)


def test_run_page_lists_its_metrics(ui, tmp_path):
    url, experiment_id, run_ids = ui
    text = rendered_text([f"{url}/#/experiments/{experiment_id}/runs/{run_ids[-1]}"], tmp_path / "profile",
                         r"Metrics \(2\) Metric Value")
    version, fvd, clipsim = RUNS[-1]
    assert f"pipeline uitest@{version}" in text
    assert re.search(rf"Metrics \(2\) Metric Value .*fvd {fvd:g}", text) and f"clipsim {clipsim:g}" in text, text[:3000]


CHARTS = r"Model metrics \(2\) .*?clipsim ([\d.]+) ([\d.]+) .*?fvd ([\d.]+) ([\d.]+)"  # each chart's bars' labels


def test_screenshot_of_the_metric_charts(ui, tmp_path):
    """The chart view (one bar per run for each of fvd and clipsim, read from its DOM) as a PNG;
    MAV_UI_SCREENSHOT copies it."""
    url, experiment_id, _ = ui
    png = tmp_path / "mlflow-ui.png"
    chromium([f"--screenshot={png}", "--window-size=1600,900",
              f"{url}/#/experiments/{experiment_id}/runs?compareRunsMode=CHART"], tmp_path / "profile")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, len(data)
    text = rendered_text(["--window-size=1600,900",  # the same view: its chart titles
                          f"{url}/#/experiments/{experiment_id}/runs?compareRunsMode=CHART"], tmp_path / "profile",
                         CHARTS)
    charts = re.search(CHARTS, text)
    assert charts, text[:3000]
    shown = [float(v) for v in charts.groups()]  # one bar per run, labelled to 2 decimals
    assert sorted(shown[:2]) == sorted(round(r[2], 2) for r in RUNS), shown
    assert sorted(shown[2:]) == sorted(round(r[1], 2) for r in RUNS), shown
    target = os.environ.get("MAV_UI_SCREENSHOT")
    if target:
        out = Path(target) if Path(target).is_absolute() else REPO / target
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(png, out)


def test_ui_over_a_real_pipeline_store(prefect_server, tmp_path, video_dir):
    """The demo's kind of store: a real (fast) pipeline run, then `mlflow server` over its SQLite file."""
    if CHROMIUM is None:
        pytest.skip("headless Chromium not found (/usr/bin/chromium): apt-get install -y chromium")
    from mlflow import MlflowClient

    from flows.pipeline import pipeline
    from tests.servers import mlflow_server
    from tests.test_pipeline import SAMPLES_ONLY, chain_steps, write_config

    summary = pipeline(config=str(write_config(tmp_path, video_dir, steps=chain_steps(*SAMPLES_ONLY))))
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = MlflowClient(store).get_run(summary["run_id"])
    with mlflow_server(tmp_path / "server", backend_store_uri=store) as server:
        experiment = run.info.experiment_id
        runs_page = rendered_text([f"{server.url}/#/experiments/{experiment}/runs"], tmp_path / "profile",
                                  re.escape(run.info.run_name))
        assert run.info.run_name in runs_page, runs_page[:3000]
        run_page = rendered_text([f"{server.url}/#/experiments/{experiment}/runs/{run.info.run_id}"],
                                 tmp_path / "profile", r"\bsmoke_fvd .*\bsmoke_clipsim |\bsmoke_clipsim .*\bsmoke_fvd ")
    for metric in ("smoke_fvd", "smoke_clipsim"):
        shown = re.search(rf"\b{metric} (-?[\d.]+(?:e-?\d+)?)\b", run_page)
        assert shown, (metric, run_page[:3000])
        value = run.data.metrics[metric]
        assert abs(float(shown.group(1)) - value) <= max(5e-4, 1e-3 * abs(value)), (metric, shown.group(1), value)


if __name__ == "__main__":  # a screenshot of any server: python -m tests.test_mlflow_ui URL EXPERIMENT_ID OUT.png
    url, experiment_id, out = sys.argv[1:4]
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        chromium([f"--screenshot={Path(out).resolve()}", "--window-size=1600,900",
                  f"{url}/#/experiments/{experiment_id}/runs?compareRunsMode=CHART"], Path(tmp) / "profile")
