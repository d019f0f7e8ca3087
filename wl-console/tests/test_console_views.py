"""The pages in process (httpx on the ASGI app): customers, routers, payments, queues and dead letters; the
operator's writes enqueue jobs with their history and audit rows; bad input changes nothing; all output escaped."""

from __future__ import annotations

import re
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from console_helpers import Harness, add_dead_letter, fetch_all, seed

XSS = "<script>alert(1)</script>"


def rows_of(html: str) -> list[str]:
    return re.findall(r'data-service-id="([^"]+)"', html)


async def test_customer_search_filters_and_pagination(console: Harness) -> None:
    await seed(console.url, services=30)
    client = await console.client("viewer")
    page = await client.get("/customers")
    assert page.status_code == 200
    first = rows_of(page.text)
    assert len(first) == 20 and first[0] == "c1"
    next_url = re.search(r'href="([^"]+)" rel="next"', page.text)
    assert next_url
    second = rows_of((await client.get(next_url.group(1).replace("&amp;", "&"))).text)
    assert len(second) == 10 and not set(first) & set(second)
    assert rows_of((await client.get("/customers?q=c2")).text)[:2] == ["c2", "c20"]
    assert rows_of((await client.get("/customers?q=10.0.0.3")).text) == ["c2"]  # by target
    assert rows_of((await client.get("/customers?q=10.0.0.0/30")).text) == ["c1", "c2"]  # by prefix: .1, .2 (.3 is outside /30)
    assert len(rows_of((await client.get("/customers?q=r1")).text)) == 20  # by router
    assert rows_of((await client.get("/customers?suspended=1")).text) == ["c2"]
    assert rows_of((await client.get("/customers?diverged=1")).text) == ["c2"]
    assert rows_of((await client.get("/customers?errors=1")).text) == ["c3"]
    assert rows_of((await client.get("/customers?q=%25")).text) == []  # LIKE wildcards are literal
    bad = await client.get("/customers?q=10.0.0.0/99")
    assert bad.status_code == 400 and "is not an IP prefix" in bad.text


async def test_pending_filter_and_counts(console: Harness) -> None:
    await seed(console.url)
    operator = await console.client("operator")
    assert (await operator.post("/customers/c3/refresh")).status_code == 303
    page = (await operator.get("/customers?pending=1")).text
    assert rows_of(page) == ["c3"]


async def test_customer_page_shows_states_and_history(console: Harness) -> None:
    await seed(console.url)
    async with await psycopg.AsyncConnection.connect(console.url, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO wl.service_history (service_id, kind, source, actor, reason, state, outcome, payment_id, detail) "
            "VALUES ('c2', 'router_action', 'worker', NULL, NULL, 'suspended', 'error', NULL, %s), "
            "       ('c2', 'event_accepted', 'webhook', 'standard', 'payment overdue', 'suspended', 'applied', 'pay-77', '{}')",
            (Jsonb({"error": "x"}),),
        )
        await conn.execute("INSERT INTO webhook.events (provider, event_id, type, payload, outcome, service_id, payment_id, amount, currency) "
                           "VALUES ('standard', 'ev-1', 'payment.approved', '{}', 'accepted', 'c2', 'pay-77', 100.5, 'ARS')")
    client = await console.client("viewer")
    page = await client.get("/customers/c2")
    assert page.status_code == 200
    assert 'data-field="desired"><span class="state state-suspended">suspended' in page.text
    assert "router differs from desired" in page.text
    kinds = re.findall(r'<li data-kind="([^"]+)"', page.text)
    assert kinds == ["event_accepted", "router_action"]  # newest first
    assert "payment overdue" in page.text and "pay-77" in page.text and "100.5" in page.text
    assert (await client.get("/customers/nope")).status_code == 404


async def test_suspend_needs_a_reason_and_a_confirmation(console: Harness) -> None:
    await seed(console.url)
    client = await console.client("operator", "olga")
    missing = await client.post("/customers/c1/action", {"action": "suspend", "reason": "  "})
    assert missing.status_code == 400 and "a reason is required" in missing.text
    bad = await client.post("/customers/c1/action", {"action": "explode", "reason": "why not"})
    assert bad.status_code == 400 and "choose suspend or activate" in bad.text
    confirm = await client.post("/customers/c1/action", {"action": "suspend", "reason": "unpaid since May"})
    assert confirm.status_code == 200 and 'name="confirm" value="yes"' in confirm.text and "unpaid since May" in confirm.text
    assert await fetch_all(console.url, "SELECT 1 FROM pgmq.q_device_actions") == []  # nothing before the confirmation
    done = await client.post("/customers/c1/action", {"action": "suspend", "reason": "unpaid since May", "confirm": "yes"})
    assert (done.status_code, done.headers["location"]) == (303, "/customers/c1")
    jobs = await fetch_all(console.url, "SELECT message FROM pgmq.q_device_actions")
    assert len(jobs) == 1
    message = jobs[0][0]
    assert {k: message[k] for k in ("type", "service_id", "reason", "source", "actor")} == {
        "type": "service.deactivate", "service_id": "c1", "reason": "unpaid since May", "source": "console", "actor": "olga"}
    history = await fetch_all(console.url, "SELECT kind, source, actor, reason, state, detail FROM wl.service_history WHERE service_id = 'c1'")
    assert [(h[0], h[1], h[2], h[3], h[4]) for h in history] == [("operator", "console", "olga", "unpaid since May", "suspended")]
    assert history[0][5]["old_desired"] == "active" and history[0][5]["new_desired"] == "suspended"
    audit = await fetch_all(console.url, "SELECT actor, action, target FROM console.audit WHERE action LIKE 'service.%'")
    assert audit == [("olga", "service.deactivate", "c1")]
    page = await client.get("/customers/c1")
    assert "Suspend of c1 queued" in page.text  # the flash
    assert "olga" in page.text and "unpaid since May" in page.text
    assert "Suspend of c1 queued" not in (await client.get("/customers/c1")).text  # shown once


async def test_viewer_sees_no_action_buttons_and_cannot_post(console: Harness) -> None:
    await seed(console.url)
    await add_dead_letter(console.url, {"type": "service.activate", "service_id": "c1"})
    viewer = await console.client("viewer")
    for path in ("/customers/c1", "/routers/r1", "/queues/device_actions/dead-letters", "/queues/device_actions/dead-letters/1"):
        page = (await viewer.get(path)).text
        assert "data-action=" not in page and "<button" not in page.replace('<button type="submit">Log out</button>', "").replace(
            '<button type="submit">Filter</button>', ""), path
    assert (await viewer.post("/customers/c1/action", {"action": "suspend", "reason": "x", "confirm": "yes"})).status_code == 403
    assert await fetch_all(console.url, "SELECT 1 FROM pgmq.q_device_actions") == []


async def test_everything_is_escaped(console: Harness) -> None:
    await seed(console.url, services=0)
    async with await psycopg.AsyncConnection.connect(console.url, autocommit=True) as conn:
        # a service id from before wl's migration 0005 (its id pattern is NOT VALID: older rows stay as they were)
        await conn.execute("ALTER TABLE wl.customer_services DROP CONSTRAINT IF EXISTS customer_services_service_id_pattern")
        await conn.execute("INSERT INTO wl.customer_services (service_id, device_id, method, target) SELECT %s, id, 'pppoe', %s FROM wl.devices",
                           (XSS, "user<b>1"))
    client = await console.client("operator")
    listed = await client.get("/customers")
    assert XSS not in listed.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in listed.text
    url = "/customers/%3Cscript%3Ealert(1)%3C%2Fscript%3E"
    assert (await client.post(url + "/action", {"action": "suspend", "reason": XSS, "confirm": "yes"})).status_code == 303
    page = await client.get(url)
    assert page.status_code == 200
    assert XSS not in page.text and "user<b>1" not in page.text
    assert page.text.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 3  # title, heading, history reason


async def test_refresh_and_router_test_enqueue_worker_jobs(console: Harness) -> None:
    await seed(console.url)
    client = await console.client("operator", "olga")
    assert (await client.post("/customers/c1/refresh")).status_code == 303
    response = await client.post("/routers/r1/test")
    assert (response.status_code, response.headers["location"]) == (303, "/routers/r1")
    messages = [row[0] for row in await fetch_all(console.url, "SELECT message FROM pgmq.q_device_actions ORDER BY msg_id")]
    assert messages[0] == {"type": "service.refresh", "service_id": "c1", "source": "console", "actor": "olga"}
    assert {k: messages[1][k] for k in ("type", "device", "source", "actor")} == {"type": "device.test", "device": "r1", "source": "console", "actor": "olga"}
    assert (await client.post("/routers/nope/test")).status_code == 404
    assert (await client.post("/customers/nope/refresh")).status_code == 404


async def test_router_list_and_page(console: Harness) -> None:
    await seed(console.url)
    await seed(console.url, router="r2", services=2, port=10)
    async with await psycopg.AsyncConnection.connect(console.url, autocommit=True) as conn:
        await conn.execute("UPDATE wl.devices SET last_contact_at = now(), last_error = 'transient: timed out', last_error_at = now() WHERE name = 'r2'")
        await conn.execute("INSERT INTO wl.device_tests (request_id, device, ok, message) VALUES ('t1', 'r1', true, 'logged in, 3 entries')")
    client = await console.client("operator")
    await client.post("/customers/c1/refresh")
    page = (await client.get("/routers")).text
    r1 = re.search(r'<tr data-router="r1">(.*?)</tr>', page, re.S)
    assert r1 is not None
    cells = re.findall(r"<td[^>]*>(.*?)</td>", r1.group(1), re.S)
    assert [re.sub(r"<[^>]+>", "", c).strip() for c in cells[3:]] == ["3", "1", "1", "1"]  # services, suspended, diverged, jobs
    assert "transient: timed out" in page
    detail = (await client.get("/routers/r1")).text
    assert "logged in, 3 entries" in detail and rows_of(detail) == []  # the services table links, no data-service-id rows
    assert "/customers/c3" in detail
    assert (await client.get("/routers/nope")).status_code == 404


async def test_payments_list_filters(console: Harness) -> None:
    async with await psycopg.AsyncConnection.connect(console.url, autocommit=True) as conn:
        for i, outcome in enumerate(("accepted", "duplicate", "unknown_service", "ignored")):
            await conn.execute("INSERT INTO webhook.events (provider, event_id, type, payload, outcome, service_id, payment_id) "
                               "VALUES ('standard', %s, 'payment.approved', '{}', %s, %s, %s)", (f"ev-{i}", outcome, f"c{i}", f"pay-{i}"))
    client = await console.client("viewer")
    page = (await client.get("/payments")).text
    assert re.findall(r'data-event-id="([^"]+)"', page) == ["ev-3", "ev-2", "ev-1", "ev-0"]
    assert 'href="/customers/c0#history"' in page
    only = (await client.get("/payments?outcome=unknown_service")).text
    assert re.findall(r'data-event-id="([^"]+)"', only) == ["ev-2"]
    found = (await client.get("/payments?q=pay-1")).text
    assert re.findall(r'data-event-id="([^"]+)"', found) == ["ev-1"]


async def _queue_state(url: str) -> list[Any]:
    return await fetch_all(url, "SELECT msg_id, message FROM pgmq.q_device_actions ORDER BY msg_id")


async def test_queue_stats(console: Harness) -> None:
    await seed(console.url)
    async with await psycopg.AsyncConnection.connect(console.url, autocommit=True) as conn:
        for _ in range(4):
            await conn.execute("SELECT pgmq.send('device_actions', '{\"type\": \"service.refresh\"}'::jsonb)")
        await conn.execute("SELECT pgmq.send('device_actions', '{\"type\": \"service.refresh\"}'::jsonb, 300)")  # scheduled
        await conn.execute("UPDATE pgmq.q_device_actions SET read_ct = 1, vt = now() + interval '30 s' WHERE msg_id = 1")  # in flight
        await conn.execute("UPDATE pgmq.q_device_actions SET read_ct = 2, vt = now() + interval '30 s', "
                           "headers = '{\"x-pg-worker-closed\": 2}' WHERE msg_id = 2")  # retry recorded: waiting
    await add_dead_letter(console.url, {"type": "service.activate", "service_id": "c1"})
    client = await console.client("viewer")
    page = (await client.get("/queues")).text
    row = re.search(r'<tr data-queue="device_actions">(.*?)</tr>', page, re.S)
    assert row is not None
    cells = [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row.group(1), re.S)]
    assert cells[:6] == ["device_actions", "5", "2", "1", "1", "1"]
    assert cells[7] == "1"


async def test_dead_letters_list_show_replay(console: Harness) -> None:
    await seed(console.url)
    first = await add_dead_letter(console.url, {"type": "service.deactivate", "service_id": "c1", "event_at": "2026-11-30T10:00:00+00:00"})
    second = await add_dead_letter(console.url, {"type": "service.activate", "service_id": "c2", "event_at": "2026-11-30T10:00:00+00:00"})
    client = await console.client("operator", "olga")
    page = (await client.get("/queues/device_actions/dead-letters")).text
    assert re.findall(r'data-dlq-id="(\d+)"', page) == [str(first), str(second)]
    assert "connection refused" in page and "service.deactivate" in page
    assert re.findall(r'data-dlq-id="(\d+)"', (await client.get("/queues/device_actions/dead-letters?type=service.activate")).text) == [str(second)]
    show = await client.get(f"/queues/device_actions/dead-letters/{first}")
    assert show.status_code == 200 and "TransientDeviceError" in show.text
    assert (await client.get("/queues/device_actions/dead-letters/999")).status_code == 404
    assert (await client.get("/queues/nope/dead-letters")).status_code == 404
    assert (await client.post("/queues/device_actions/dead-letters/replay", {})).status_code == 400
    gone = await client.post("/queues/device_actions/dead-letters/replay", {"ids": [str(first), "999"]})
    assert gone.status_code == 409 and "nothing changed" in gone.text
    assert await _queue_state(console.url) == []
    response = await client.post("/queues/device_actions/dead-letters/replay", {"ids": [str(first)]})
    assert response.status_code == 303
    queued = await _queue_state(console.url)
    assert [m for _, m in queued] == [{"type": "service.deactivate", "service_id": "c1", "event_at": "2026-11-30T10:00:00+00:00"}]
    assert re.findall(r'data-dlq-id="(\d+)"', (await client.get("/queues/device_actions/dead-letters")).text) == [str(second)]
    history = await fetch_all(console.url, "SELECT kind, source, actor, reason FROM wl.service_history WHERE service_id = 'c1'")
    assert history == [("operator", "console", "olga", "dead letter replayed")]


async def test_purge_is_admin_only_and_needs_the_name(console: Harness) -> None:
    await seed(console.url)
    ids = [await add_dead_letter(console.url, {"type": "service.activate", "service_id": f"c{i}"}) for i in (1, 2, 3)]
    operator = await console.client("operator")
    assert (await operator.post("/queues/device_actions/dead-letters/purge", {"ids": [str(ids[0])], "confirm_name": "device_actions"})).status_code == 403
    assert "formaction" not in (await operator.get("/queues/device_actions/dead-letters")).text
    admin = await console.client("admin", "root")
    wrong = await admin.post("/queues/device_actions/dead-letters/purge", {"ids": [str(ids[0])], "confirm_name": "device_action"})
    assert wrong.status_code == 400 and "type the queue&#39;s name" in wrong.text
    done = await admin.post("/queues/device_actions/dead-letters/purge", {"ids": [str(ids[0])], "confirm_name": "device_actions"})
    assert done.status_code == 303
    left = await fetch_all(console.url, "SELECT msg_id FROM pgmq.q_device_actions_dlq ORDER BY msg_id")
    assert [r[0] for r in left] == ids[1:]
    everything = await admin.post("/queues/device_actions/dead-letters/purge", {"all": "yes", "confirm_name": "device_actions"})
    assert everything.status_code == 303
    assert await fetch_all(console.url, "SELECT msg_id FROM pgmq.q_device_actions_dlq") == []
    audit = await fetch_all(console.url, "SELECT actor, action FROM console.audit WHERE action = 'dead_letter.purge'")
    assert audit == [("root", "dead_letter.purge"), ("root", "dead_letter.purge")]
