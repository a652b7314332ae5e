"""`GET /metrics`: every metric in Prometheus' text format (or OpenMetrics, when the scraper asks for
it), for a scraper on the internal network.
Open by default, like /healthz; with DRAFTLOOP_METRICS_TOKEN set it needs that token as a bearer
token. Never rate limited, since no API key is involved."""

import hmac
from typing import Annotated

from fastapi import APIRouter, Header, Response

from api.deps import SessionsDep, SettingsDep
from core import metrics
from core.errors import Unauthorized
from training import metrics as training_metrics

router = APIRouter(tags=["health"])


@router.get("/metrics", include_in_schema=False)
def scrape(
    sessions: SessionsDep,
    settings: SettingsDep,
    authorization: Annotated[str | None, Header()] = None,
    accept: Annotated[str | None, Header()] = None,
):
    if settings.metrics_token and not hmac.compare_digest(
        (authorization or "").encode(), f"Bearer {settings.metrics_token}".encode()
    ):
        raise Unauthorized("send the metrics token as `Authorization: Bearer <DRAFTLOOP_METRICS_TOKEN>`")
    body, content_type = metrics.exposition(training_metrics.collect(sessions), accept)
    return Response(body, media_type=content_type)
