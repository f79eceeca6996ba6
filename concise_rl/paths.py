"""Where local state lives: everything under one home folder.

``./.concise-rl/`` by default, or ``$CONCISE_RL_HOME``. Nothing the pipeline writes
goes anywhere else, so deleting that folder resets a machine.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("CONCISE_RL_HOME", ".concise-rl")).resolve()


def mlflow_db() -> Path:
    return home() / "mlflow.db"


def mlflow_artifacts() -> Path:
    return home() / "mlartifacts"


def checkpoints(phase: str) -> Path:
    return home() / "checkpoints" / phase


def models() -> Path:
    return home() / "models"


def curation() -> Path:
    return home() / "curation"


def evaluations() -> Path:
    return home() / "evaluations"


def reports() -> Path:
    return home() / "reports"


def prefect_home() -> Path:
    return home() / "prefect"


def store() -> Path:
    """The default artifact store (``store.uri`` unset): a local folder."""
    return home() / "store"
