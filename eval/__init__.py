"""Video metrics: FVD, CLIPSIM and the Inception Score (see docs/metrics.md)."""
from __future__ import annotations

from typing import Sequence

METRICS = ("fvd", "clipsim", "is")


def metric_list(metrics: str | Sequence[str]) -> list[str]:
    """"FVD, clipsim" or a list of names -> ["fvd", "clipsim"]; an unknown name is a ValueError."""
    metrics = [m.strip().lower() for m in (metrics.split(",") if isinstance(metrics, str) else metrics) if m.strip()]
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {', '.join(METRICS)}")
    if not metrics:
        raise ValueError(f"no metrics given; choose from {', '.join(METRICS)}")
    return metrics
