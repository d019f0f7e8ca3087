"""The fallback poll's timetable: a base interval, optionally different inside local-time windows.

Operations asked for "every 15 minutes between 08:00 and 18:00, America/Santiago". That is written
``"08:00-18:00 every 15m"`` with ``timezone="America/Santiago"``; several windows are separated by ``;``
and a window may cross midnight (``22:00-06:00 every 1h``). Outside every window the base interval applies;
a base interval of ``None`` means no fallback poll outside the windows at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_WINDOW = re.compile(
    r"\s*(?P<start>\d{1,2}:\d{2})\s*-\s*(?P<end>\d{1,2}:\d{2})\s+every\s+(?P<every>\d+(?:\.\d+)?)\s*(?P<unit>ms|s|m|h)?\s*"
)
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class InvalidSchedule(ValueError):
    """A poll schedule that cannot be understood."""


def parse_duration(text: str) -> float:
    """``"90"``, ``"90s"``, ``"15m"``, ``"1h"``, ``"250ms"`` -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", text)
    if not match:
        raise InvalidSchedule(f"invalid duration {text!r}: use a number with an optional unit ms, s, m or h")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _parse_time(text: str) -> time:
    hours, minutes = (int(part) for part in text.split(":"))
    if not (0 <= hours <= 23 and 0 <= minutes <= 59):
        raise InvalidSchedule(f"invalid time of day {text!r}")
    return time(hours, minutes)


def _edge_instant(wall: datetime, tz: tzinfo | None) -> datetime:
    """The instant (UTC) at which the clocks of ``tz`` first show the naive wall time ``wall``.

    On a fall-back day that is its first occurrence. On a spring-forward day a wall time inside the gap never
    shows: the clocks jump past it, and that jump is its instant. (zoneinfo alone would put it an hour after the
    jump, which can carry a window's start past its end and skip the whole window that day.)
    """
    first = wall.replace(tzinfo=tz, fold=0).astimezone(UTC)
    second = wall.replace(tzinfo=tz, fold=1).astimezone(UTC)
    if second >= first:  # an ordinary wall time, or a repeated one (fold=0 is the first)
        return first
    # Inside a gap: fold=1 reads it with the later offset (an instant before the jump), fold=0 with the earlier
    # (after it). Find the jump between them to the millisecond.
    before, after = second, first
    while after - before > timedelta(milliseconds=1):
        middle = before + (after - before) / 2
        if middle.astimezone(tz).replace(tzinfo=None) >= wall:
            after = middle
        else:
            before = middle
    return after


@dataclass(frozen=True)
class PollWindow:
    start: time
    end: time
    interval: float

    def contains(self, moment: time) -> bool:
        if self.start <= self.end:
            return self.start <= moment < self.end
        return moment >= self.start or moment < self.end  # crosses midnight


@dataclass(frozen=True)
class PollSchedule:
    """When the next fallback poll is due. Pure: the caller supplies the current time."""

    interval: float | None = 60.0
    windows: tuple[PollWindow, ...] = ()
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        if self.interval is not None and self.interval <= 0:
            raise InvalidSchedule("poll interval must be > 0 (or None for no poll outside windows)")
        for window in self.windows:
            if window.interval <= 0:
                raise InvalidSchedule("a window's poll interval must be > 0")
            if window.start == window.end:
                raise InvalidSchedule("a poll window must not start and end at the same time")
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise InvalidSchedule(f"unknown time zone {self.timezone!r}") from exc

    @classmethod
    def parse(cls, windows: str | None, *, interval: float | None = 60.0, timezone: str = "UTC") -> PollSchedule:
        parsed: list[PollWindow] = []
        for part in (windows or "").split(";"):
            if not part.strip():
                continue
            match = _WINDOW.fullmatch(part)
            if not match:
                raise InvalidSchedule(f"invalid poll window {part.strip()!r}: expected e.g. '08:00-18:00 every 15m'")
            every = float(match.group("every")) * _UNITS[match.group("unit")]
            parsed.append(PollWindow(_parse_time(match.group("start")), _parse_time(match.group("end")), every))
        return cls(interval=interval, windows=tuple(parsed), timezone=timezone)

    def _rate_at(self, local: datetime) -> float | None:
        moment = local.time()
        for window in self.windows:
            if window.contains(moment):
                return window.interval
        return self.interval

    def _next_boundary(self, local: datetime) -> tuple[datetime, time] | None:
        """The next instant after ``local`` at which some window starts or ends, and that edge's time of day.

        Compared and subtracted in UTC: arithmetic between datetimes of one zone is wall-clock arithmetic in
        Python, which is off by the shift on the days the clocks change. An edge that does not exist that day
        (inside a spring-forward gap) happens when the clocks jump past it (:func:`_edge_instant`).
        """
        tz = local.tzinfo
        now_utc = local.astimezone(UTC)
        candidates = []
        for day in range(3):
            date = (local + timedelta(days=day)).date()
            for window in self.windows:
                for edge in (window.start, window.end):
                    instant = _edge_instant(datetime.combine(date, edge), tz)
                    if instant > now_utc:
                        candidates.append((instant, edge))
        return min(candidates) if candidates else None

    def next_delay(self, now: datetime, *, jitter: float = 0.0) -> float | None:
        """Seconds from ``now`` (timezone-aware) until the next poll, or ``None`` if none is ever due.

        ``jitter`` (0 to 1) shortens a poll interval by that fraction; it never moves the poll that comes
        as a window opens, so a poll can never land outside a window.
        """
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        zone = ZoneInfo(self.timezone)
        local = now.astimezone(zone)
        elapsed = 0.0
        for _ in range(8):  # a few boundaries at most: enough to cross any day's windows
            rate = self._rate_at(local)
            found = self._next_boundary(local)
            until_boundary = None if found is None else (found[0] - local.astimezone(UTC)).total_seconds()
            if rate is not None and (until_boundary is None or rate <= until_boundary):
                return elapsed + rate * (1.0 - jitter)
            if found is None or until_boundary is None:
                return None
            elapsed += until_boundary
            local = found[0].astimezone(zone)
            if any(w.start == found[1] for w in self.windows) and self._rate_at(local) is not None:
                return elapsed  # poll as a window opens
        return elapsed
