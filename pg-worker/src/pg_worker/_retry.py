"""When to try a failed job again, as a small pure object."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field


class RetryLater(Exception):
    """Raised by a handler to have its job tried again after ``delay`` seconds.

    By default the attempt still counts towards the queue's ``max_attempts``: a device that never comes back
    must not keep a job alive forever. With ``count_attempt=False`` it does not (a busy resource is not a
    failure): the job is *deferred*, its attempt number stays the same, and it is never dead-lettered for it,
    however often it is deferred. Use that only for a condition that is known to pass (a lock held by another
    job), never for an error.
    """

    def __init__(self, delay: float, reason: str = "", *, count_attempt: bool = True) -> None:
        if not (math.isfinite(delay) and delay >= 0):  # NaN or infinity would fail in SQL, after the work
            raise ValueError("delay must be a finite number >= 0")
        super().__init__(reason or f"retry requested in {delay:g}s")
        self.delay = float(delay)
        self.reason = reason
        self.count_attempt = count_attempt


class PermanentFailure(Exception):
    """Raised by a handler when trying again cannot help: the job goes straight to the dead-letter queue."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: ``base_delay * 2**(attempt-1)``, capped at ``max_delay``.

    ``jitter`` is the fraction of the delay that is randomised (0.0 = none, 1.0 = "full jitter").
    ``attempt`` is pgmq's ``read_ct``: 1 for the first delivery.
    """

    max_attempts: int = 5
    base_delay: float = 2.0
    max_delay: float = 600.0
    jitter: float = 0.25
    random: Callable[[], float] = field(default=random.random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("delays must be >= 0")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError("jitter must be between 0 and 1")

    def backoff(self, attempt: int) -> float:
        """The delay before the attempt after ``attempt``, jitter included."""
        exponent = min(max(attempt - 1, 0), 62)
        delay = min(self.max_delay, self.base_delay * (2.0**exponent))
        return delay * (1.0 - self.jitter * self.random())

    def decide(self, attempt: int, error: BaseException) -> float | None:
        """Seconds until the next attempt, or ``None`` to give up (dead-letter the job)."""
        if isinstance(error, PermanentFailure):
            return None
        if isinstance(error, RetryLater) and not error.count_attempt:
            return error.delay  # a deferral: not an attempt, so never the last one
        if attempt >= self.max_attempts:
            return None
        if isinstance(error, RetryLater):
            return error.delay
        return self.backoff(attempt)
