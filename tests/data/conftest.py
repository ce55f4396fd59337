"""Shared fixtures for the data-loader tests: the offline data folder and JSON writers."""

import json
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The offline data folder; tests using it skip when it is absent (a fresh clone)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"offline data folder {SHARED_DATA} is absent")
    return SHARED_DATA.resolve()


@pytest.fixture
def write_labelled():
    """Write ``[(sentence, label), ...]`` as the ``{"label", "sentence"}`` JSON list the loaders read."""

    def write(path: Path, pairs, labels=None) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([{"label": label, "sentence": sentence} for sentence, label in pairs]))
        if labels is not None:
            (path.parent / "labels.json").write_text(json.dumps(labels))
        return path

    return write
