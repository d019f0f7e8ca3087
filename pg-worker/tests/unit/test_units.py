"""Pure parts: names, retry policy, poll schedule, routing, producer validation, settings, public API."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pydantic
import pytest

import pg_worker
from pg_worker import App, BadMessage, InvalidQueueName, PermanentFailure, PollSchedule, RetryLater, RetryPolicy
from pg_worker._names import dlq_name, source_of_dlq, validate_queue_name
from pg_worker._producer import build_message
from pg_worker._schedule import InvalidSchedule, parse_duration
from pg_worker.logging_setup import redact_text
from pg_worker.settings import WorkerSettings, load_app


@pytest.mark.parametrize("name", ["jobs", "device_activations", "q1", "a" * 43])
def test_valid_queue_names(name: str) -> None:
    assert validate_queue_name(name) == name


@pytest.mark.parametrize("name", ["Jobs", "jobsQ", "1jobs", "_jobs", "jobs-x", "", "jobs x", "a" * 44, "jobs_dlq", "été"])
def test_invalid_queue_names_are_refused_with_a_reason(name: str) -> None:
    with pytest.raises(InvalidQueueName, match="invalid queue name"):
        validate_queue_name(name)


def test_dlq_names_round_trip() -> None:
    assert dlq_name("jobs") == "jobs_dlq"
    assert source_of_dlq("jobs_dlq") == "jobs"
    with pytest.raises(InvalidQueueName):
        source_of_dlq("jobs")


def test_retry_policy_backs_off_exponentially_with_a_cap_and_gives_up() -> None:
    policy = RetryPolicy(max_attempts=6, base_delay=1.0, max_delay=5.0, jitter=0.0)
    error = RuntimeError("x")
    assert [policy.decide(a, error) for a in range(1, 7)] == [1.0, 2.0, 4.0, 5.0, 5.0, None]


def test_retry_policy_jitter_only_shortens_and_is_injectable() -> None:
    policy = RetryPolicy(base_delay=8.0, jitter=0.5, random=lambda: 1.0)
    assert policy.backoff(1) == 4.0
    spread = RetryPolicy(base_delay=8.0, jitter=0.5, random=random.Random(1).random)
    assert all(4.0 <= spread.backoff(1) <= 8.0 for _ in range(100))


def test_retry_later_and_permanent_failure() -> None:
    policy = RetryPolicy(max_attempts=3)
    assert policy.decide(1, RetryLater(7.5)) == 7.5
    assert policy.decide(3, RetryLater(7.5)) is None, "retry-later still counts attempts"
    assert policy.decide(1, PermanentFailure("no")) is None
    with pytest.raises(ValueError, match="delay"):
        RetryLater(-1)
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


SANTIAGO = ZoneInfo("America/Santiago")


def _at(hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 11, 27, hour, minute, tzinfo=SANTIAGO)


def test_schedule_polls_at_the_window_rate_inside_and_the_base_rate_outside() -> None:
    schedule = PollSchedule.parse("08:00-18:00 every 15m", interval=3600, timezone="America/Santiago")
    assert schedule.next_delay(_at(9)) == 900
    # 17:50: the next 15-minute slot falls after the window, so the hourly rate counts from 18:00
    assert schedule.next_delay(_at(17, 50)) == 600 + 3600
    # 07:30, outside, base hourly: the window opening at 08:00 comes first
    assert schedule.next_delay(_at(7, 30)) == 1800


def test_schedule_without_a_base_interval_sleeps_until_the_next_window() -> None:
    schedule = PollSchedule.parse("08:00-18:00 every 15m", interval=None, timezone="America/Santiago")
    assert schedule.next_delay(_at(18)) == 14 * 3600
    assert schedule.next_delay(_at(17, 55)) == 5 * 60 + 14 * 3600


def test_schedule_windows_may_cross_midnight_and_accept_utc_input() -> None:
    schedule = PollSchedule.parse("22:00-06:00 every 1h", interval=60, timezone="America/Santiago")
    assert schedule.next_delay(_at(23)) == 3600
    assert schedule.next_delay(_at(12)) == 60
    assert schedule.next_delay(_at(23).astimezone(UTC)) == 3600


def test_schedule_default_is_every_60s_and_bad_specs_are_refused() -> None:
    assert PollSchedule().next_delay(datetime.now(UTC)) == 60
    assert PollSchedule(interval=None).next_delay(datetime.now(UTC)) is None
    for spec in ["8-18 every 15m", "08:00-18:00", "25:00-26:00 every 1m", "08:00-08:00 every 1m"]:
        with pytest.raises(InvalidSchedule):
            PollSchedule.parse(spec)
    with pytest.raises(InvalidSchedule, match="time zone"):
        PollSchedule(timezone="Mars/Olympus")
    assert parse_duration("250ms") == 0.25
    assert parse_duration("2h") == 7200


class Payload(pydantic.BaseModel):
    customer_id: int


def _app() -> App:
    app = App()
    app.add_handler("devices", lambda job: None, type="activate", schema=Payload)
    app.add_handler("devices", lambda job: None)
    app.add_handler("strict", lambda job: None, type="only")
    return app


def test_routing_by_type_with_a_default_handler() -> None:
    app = _app()
    handler, job_type = app.resolve("devices", {"type": "activate", "customer_id": 1})
    assert (handler.job_type, job_type) == ("activate", "activate")
    assert handler.parse({"customer_id": "5"}) == Payload(customer_id=5)
    assert app.resolve("devices", {"type": "other"})[0].job_type is None
    assert app.resolve("devices", {})[0].job_type is None


@pytest.mark.parametrize(
    ("queue", "message", "reason"),
    [
        ("devices", [1], "not_an_object"),
        ("devices", None, "not_an_object"),
        ("devices", {"type": 3}, "invalid_type"),
        ("strict", {"type": "nope"}, "unknown_type"),
        ("strict", {}, "unknown_type"),
    ],
)
def test_routing_rejects_what_no_handler_takes(queue: str, message: Any, reason: str) -> None:
    with pytest.raises(BadMessage) as info:
        _app().resolve(queue, message)
    assert info.value.reason == reason


def test_schema_errors_are_summarised() -> None:
    handler, _ = _app().resolve("devices", {"type": "activate"})
    with pytest.raises(BadMessage, match="customer_id: Field required"):
        handler.parse({"type": "activate"})


def test_app_refuses_duplicates_and_empty_queues() -> None:
    app = App()
    app.add_handler("jobs", lambda job: None)
    with pytest.raises(ValueError, match="already has a handler"):
        app.add_handler("jobs", lambda job: None)
    app.queue("lonely")
    with pytest.raises(ValueError, match="queues without handlers: lonely"):
        app.validate()
    with pytest.raises(ValueError, match="no queues"):
        App().validate()
    with pytest.raises(ValueError, match="visibility_timeout"):
        App().queue("jobs", visibility_timeout=0)


def test_build_message_sets_and_checks_the_type() -> None:
    assert build_message({"a": 1}, "activate") == {"a": 1, "type": "activate"}
    assert build_message({"type": "activate"}, "activate") == {"type": "activate"}
    with pytest.raises(ValueError, match="differs"):
        build_message({"type": "x"}, "activate")
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        build_message({"a": float("nan")}, None)


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PG_WORKER_CONCURRENCY", "7")
    monkeypatch.setenv("PG_WORKER_POLL_INTERVAL", "off")
    monkeypatch.setenv("PG_WORKER_POLL_WINDOWS", "08:00-18:00 every 15m")
    monkeypatch.setenv("PG_WORKER_POLL_TIMEZONE", "America/Santiago")
    monkeypatch.setenv("PG_WORKER_LISTEN", "false")
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:p@db/x")
    settings = WorkerSettings()
    config = settings.worker_config()
    assert settings.database_url == "postgresql://u:p@db/x"
    assert (config.concurrency, config.listen, config.poll.interval) == (7, False, None)
    assert config.poll.next_delay(_at(9)) == 900


def test_load_app_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="must look like"):
        load_app("nocolon")
    with pytest.raises(ValueError, match="cannot import"):
        load_app("no_such_module_xyz:app")
    with pytest.raises(ValueError, match=r"not a pg_worker\.App"):
        load_app("json:__name__")


def test_secrets_are_masked_in_log_text() -> None:
    assert redact_text("postgresql://worker:s3cr3t@db:5432/x") == "postgresql://worker:[redacted]@db:5432/x"
    assert "s3cr3t" not in redact_text("host=db password=s3cr3t user=w")


def test_public_api_is_exactly_what_init_exports() -> None:
    public = {name for name in dir(pg_worker) if not name.startswith("_")}
    modules = {"admin", "cli", "health", "logging_setup", "metrics", "migrations", "observability", "settings", "testing"}
    assert public - modules == set(pg_worker.__all__)
    for name in pg_worker.__all__:
        assert getattr(pg_worker, name) is not None


def test_delays_accept_timedelta() -> None:
    from pg_worker._producer import _delay_seconds

    assert _delay_seconds(timedelta(minutes=2)) == 120
    assert _delay_seconds(None) == 0


def _utc_delay(schedule: PollSchedule, now_local: datetime, expected_local: datetime, **kwargs: Any) -> tuple[float | None, float]:
    """What the schedule says, and the true number of seconds between the two instants (through UTC)."""
    delay = schedule.next_delay(now_local, **kwargs)
    return delay, (expected_local.astimezone(UTC) - now_local.astimezone(UTC)).total_seconds()


@pytest.mark.parametrize(
    ("zone", "evening", "morning"),
    [
        # Berlin springs forward on 2026-03-29 (02:00 -> 03:00) and falls back on 2026-10-25 (03:00 -> 02:00).
        ("Europe/Berlin", datetime(2026, 3, 28, 18, 0), datetime(2026, 3, 29, 8, 0)),
        ("Europe/Berlin", datetime(2026, 10, 24, 18, 0), datetime(2026, 10, 25, 8, 0)),
        # Santiago springs forward on 2026-09-06 (00:00 -> 01:00) and falls back on 2026-04-05 (00:00 -> 23:00).
        ("America/Santiago", datetime(2026, 9, 5, 18, 0), datetime(2026, 9, 6, 8, 0)),
        ("America/Santiago", datetime(2026, 4, 4, 18, 0), datetime(2026, 4, 5, 8, 0)),
    ],
)
def test_schedule_windows_hold_in_wall_clock_time_across_daylight_saving_changes(zone: str, evening: datetime, morning: datetime) -> None:
    tz = ZoneInfo(zone)
    schedule = PollSchedule.parse("08:00-18:00 every 15m", interval=None, timezone=zone)
    delay, true_seconds = _utc_delay(schedule, evening.replace(tzinfo=tz), morning.replace(tzinfo=tz))
    assert delay == true_seconds, "the next poll comes exactly as the window opens at 08:00 local time"
    assert true_seconds != 14 * 3600, "the test dates do cross a clock change"


def test_schedule_window_starting_inside_a_spring_forward_gap_opens_when_the_clocks_jump() -> None:
    tz = ZoneInfo("America/Santiago")  # 2026-09-06 00:00 does not exist: the clocks go from 23:59:59 to 01:00
    schedule = PollSchedule.parse("00:00-06:00 every 1h", interval=None, timezone="America/Santiago")
    now = datetime(2026, 9, 5, 22, 0, tzinfo=tz)
    delay = schedule.next_delay(now)
    assert delay == 2 * 3600, "the window opens when the clocks jump to 01:00, two real hours later"


def test_a_window_whose_start_falls_in_a_spring_forward_gap_still_polls_that_day() -> None:
    tz = ZoneInfo("America/Santiago")  # on 2026-09-06 the clocks go from 23:59:59 to 01:00
    schedule = PollSchedule.parse("00:30-01:30 every 10m", interval=None, timezone="America/Santiago")
    now = datetime(2026, 9, 5, 22, 0, tzinfo=tz).astimezone(UTC)
    polls = []
    for _ in range(5):
        delay = schedule.next_delay(now)
        assert delay is not None
        now += timedelta(seconds=delay)
        polls.append(now.astimezone(tz).strftime("%d %H:%M"))
    # The window's wall-clock part that exists that day, 01:00-01:30, is polled; then the next day's.
    assert polls == ["06 01:00", "06 01:10", "06 01:20", "06 01:30", "07 00:30"]


def test_jitter_shortens_intervals_but_never_moves_a_poll_outside_a_window() -> None:
    schedule = PollSchedule.parse("08:00-18:00 every 15m", interval=None, timezone="UTC")
    before_window = datetime(2026, 5, 4, 7, 0, tzinfo=UTC)
    assert schedule.next_delay(before_window, jitter=0.1) == 3600, "the opening poll is not jittered earlier"
    inside = datetime(2026, 5, 4, 9, 0, tzinfo=UTC)
    assert schedule.next_delay(inside, jitter=0.1) == pytest.approx(900 * 0.9)
