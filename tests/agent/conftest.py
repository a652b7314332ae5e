import pytest

from agent.adapters import AdapterRef
from tests.factories import random_lora


@pytest.fixture(scope="session")
def adapters(tiny_model, tmp_path_factory) -> list[AdapterRef]:
    """Three random adapters for the tiny model: two on every projection, one on q and v only."""
    folder = tmp_path_factory.mktemp("engine-adapters")
    config = tiny_model.model.config
    shapes = [(None, 4), (None, 8), (["q_proj", "v_proj"], 4)]
    return [
        AdapterRef(i + 1, random_lora(config, folder / str(i), rank=rank, targets=targets, seed=100 + i))
        for i, (targets, rank) in enumerate(shapes)
    ]
