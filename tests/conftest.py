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


def sqlite_store(root: Path, config) -> str:
    """URI of a fresh, empty sqlite tracking store in `root`.

    Creating MLflow's tables takes ~10 s, so the first empty store is kept in pytest's
    cache (per MLflow version) and copied afterwards.
    """
    import shutil

    import mlflow

    db = root / "mlflow.db"
    cache = getattr(config, "cache", None)
    template = cache.mkdir(f"mlflow-{mlflow.__version__}-empty-store") / "mlflow.db" if cache else None
    if template is not None and template.is_file():
        shutil.copyfile(template, db)
    else:
        mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()  # creates the tables
        if template is not None:
            tmp = template.with_suffix(f".{os.getpid()}.tmp")
            shutil.copyfile(db, tmp)
            os.replace(tmp, template)
    return f"sqlite:///{db}"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny networks gain nothing from threads, and OpenMP spinning on a shared 2-core
    machine can make them 30x slower. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
