from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared").resolve()
SHARED_DATA = SHARED / "data"
SHARED_WEIGHTS = SHARED / "weights"

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def need_shared(*parts: str) -> Path:
    """Path under ../shared, or skip the test with a clear reason if it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the shared developer data/weights folder is absent)")
    return path


@pytest.fixture
def shared_data() -> Path:
    return need_shared("data")


@pytest.fixture
def shared_weights() -> Path:
    return need_shared("weights")
