"""A request rate limit per client address and, with auth on, per subject (token buckets): 429
with ``Retry-After`` beyond either. A subject cannot escape its limit by using many addresses,
nor an address by presenting many tokens.

Per process and in memory: a bucket refills at ``rate`` requests a second up to ``burst``. The
table is bounded: when it grows past ``MAX_BUCKETS``, buckets that are full again (clients
that went quiet) are dropped. ``/healthz`` is never limited.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from chunkd import errors as E
from chunkd.api.access import client_address, known_subject

MAX_BUCKETS = 100_000


class RateLimiter:
    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, stamp)

    def wait(self, key: str) -> float:
        """Take one token for ``key``: 0 if allowed, else the seconds until one is there."""
        now = self.clock()
        tokens, stamp = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - stamp) * self.rate)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return (1 - tokens) / self.rate
        if len(self._buckets) >= MAX_BUCKETS and key not in self._buckets:
            self._prune(now)
        self._buckets[key] = (tokens - 1, now)
        return 0.0

    def _prune(self, now: float) -> None:
        full = [k for k, (t, s) in self._buckets.items()
                if t + (now - s) * self.rate >= self.burst]
        for k in full:
            del self._buckets[k]


def rate_limit_middleware(limiter: RateLimiter) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path != "/healthz":
            wait = limiter.wait(f"address:{client_address(request)}")
            subject = known_subject(request)
            if subject is not None:
                wait = max(wait, limiter.wait(f"subject:{subject}"))
            if wait > 0:
                raise E.RATE_LIMITED(retry_after=math.ceil(wait))
        return await handler(request)

    return middleware
