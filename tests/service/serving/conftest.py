"""Fixtures shared by the serving tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app
from tests.service.helpers import SMALL_REQUEST_CHARS


@pytest.fixture
def small_client(tiny_serving_settings: Settings) -> Iterator[TestClient]:
    """The tiny base served with ``max_request_chars`` of :data:`SMALL_REQUEST_CHARS`."""
    from service.serving.lifespan import serving

    settings = tiny_serving_settings.model_copy(update={"max_request_chars": SMALL_REQUEST_CHARS})
    with TestClient(create_app(settings, hooks=[serving])) as client:
        yield client
