"""Repository-wide pytest fixtures (tests/conftest.py holds the data fixtures)."""
from __future__ import annotations

import pytest

from components.config import set_offline_env

set_offline_env()

TINY_TEXTS = [
    "what is the capital of france", "who wrote hamlet", "how many legs does a spider have",
    "great film , loved it", "terrible plot and bad acting", "win a free prize now call",
    "see you at lunch tomorrow", "negative positive description entity abbreviation human number location",
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama + ChatML tokenizer saved on disk (built once per session)."""
    from components.model.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"), texts=TINY_TEXTS)


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server/database for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def pytest_collection_modifyitems(config, items):
    """Browser tests (`@pytest.mark.browser`) need Chromium and Playwright: they run only when the -m
    expression names them (`make browser-check` runs `pytest -m browser`), so `make test` and CI skip them."""
    if "browser" in (config.option.markexpr or ""):
        return
    kept = [item for item in items if item.get_closest_marker("browser") is None]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("browser")])
        items[:] = kept
