"""Per-key rate limits, counted in Redis so that every API process shares one count: the
`limits` package's sliding window counter. Past the limit a request is refused with 429 and
Retry-After. With Redis unreachable requests are let through (and a warning logged): drafting
and review must not stop because the counter is away."""

import logging
import math
import time

from limits import RateLimitItem, parse
from limits.storage import storage_from_string
from limits.strategies import SlidingWindowCounterRateLimiter
from redis.exceptions import RedisError

from core.errors import RateLimited

log = logging.getLogger(__name__)
REDIS_TIMEOUT_S = 0.5  # a Redis that does not answer in time counts as unreachable


class KeyRateLimit:
    def __init__(self, redis_url: str, limit: str) -> None:
        self.limit: RateLimitItem = parse(limit)
        storage = storage_from_string(redis_url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S)
        self.limiter = SlidingWindowCounterRateLimiter(storage)

    def hit(self, key_id: int) -> None:
        """Count one request of the key; raise RateLimited if it is over its limit."""
        try:
            if self.limiter.hit(self.limit, "api-key", str(key_id)):
                return
            reset_at = self.limiter.get_window_stats(self.limit, "api-key", str(key_id)).reset_time
        except RedisError as error:
            log.warning("rate limit not checked: Redis is unreachable (%s)", error)
            return
        raise RateLimited(
            f"this API key is over its rate limit of {self.limit}; retry later",
            retry_after_s=max(1, math.ceil(reset_at - time.time())),
        )
