"""The settings, as a process reads them from its environment when it starts."""

import pytest
from pydantic import ValidationError

from core.settings import Settings


def test_a_reply_length_default_over_its_limit_is_refused_at_start_up(monkeypatch):
    monkeypatch.setenv("DRAFTLOOP_MAX_NEW_TOKENS", "2048")
    with pytest.raises(ValidationError, match="max_new_tokens 2048 is over max_new_tokens_limit 1024"):
        Settings()
    monkeypatch.setenv("DRAFTLOOP_MAX_NEW_TOKENS_LIMIT", "2048")
    assert Settings().reply_length(None) == 2048
