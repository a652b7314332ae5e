import os
from collections.abc import Iterator

import httpx
import pytest

from tests.live import Keys, Live, drop_database, fresh_database


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def live(request, tiny_base_dir, tmp_path_factory) -> Iterator[Live]:
    """`draftloop serve` as a subprocess with the tiny model, on a fresh database of each kind."""
    folder = tmp_path_factory.mktemp(f"live-{request.param}")
    url = fresh_database(request.param, folder)
    redis_url = os.environ["DRAFTLOOP_REDIS_URL"]
    with Live(url, redis_url, folder, base_model=str(tiny_base_dir), settings={"model_dtype": "float32"}) as server:
        server.start_api()
        yield server
    drop_database(url)


@pytest.fixture
def client(live) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, timeout=60, limits=httpx.Limits(max_connections=64)) as http:
        yield http


@pytest.fixture
def keys(live) -> Keys:
    return live.tenant()
