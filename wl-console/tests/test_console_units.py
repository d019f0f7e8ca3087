"""The console's parts with plain objects, no database and no server: signing, redirects, SQL assembly,
permissions, settings, and the templates' base context and escaping."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import SecretStr

from wl_console import _sql
from wl_console.app import _templates
from wl_console.permissions import Permission, permissions_of
from wl_console.sessions import Actor, Signer
from wl_console.settings import ConsoleSettings
from wl_console.web import BASE_CONTEXT, safe_next

KEY = b"k" * 32


def test_exported_members() -> None:
    import wl_console

    assert sorted(wl_console.__all__) == ["ConsoleSettings", "MigrationError", "Permission", "ROLE_PERMISSIONS", "create_app", "migrate"]
    assert all(getattr(wl_console, name) is not None for name in wl_console.__all__)


def test_signed_values_refuse_tampering_and_other_purposes() -> None:
    signer = Signer(KEY)
    signed = signer.sign("session", "token123")
    assert signer.unsign("session", signed) == "token123"
    assert signer.unsign("pre", signed) is None  # a pre-session cookie is no session
    assert signer.unsign("session", signed[:-1] + ("A" if signed[-1] != "A" else "B")) is None
    assert signer.unsign("session", "token123") is None and signer.unsign("session", None) is None
    assert Signer(b"x" * 32).unsign("session", signed) is None
    assert signer.check_csrf("token123", signer.csrf_token("token123"))
    assert not signer.check_csrf("token123", signer.csrf_token("other")) and not signer.check_csrf(None, "x") and not signer.check_csrf("t", "")


def test_flashes_round_trip_and_forged_ones_are_dropped() -> None:
    signer = Signer(KEY)
    assert signer.load_flashes(signer.dump_flashes([("ok", "<b>done</b>")])) == [("ok", "<b>done</b>")]
    assert signer.load_flashes("W1sib2siLCAiaGkiXV0.forged") == []


@pytest.mark.parametrize(("value", "expected"), [
    ("/routers?x=1", "/routers?x=1"), (None, "/customers"), ("", "/customers"), ("//evil.example", "/customers"),
    ("https://evil.example/", "/customers"), ("/\\evil", "/customers"), ("customers", "/customers"),
])
def test_safe_next(value: str | None, expected: str) -> None:
    assert safe_next(value) == expected


def test_customer_search_is_assembled_from_known_fragments_only() -> None:
    with pytest.raises(ValueError, match="unknown customer filters"):
        _sql.list_customers(["q", "1=1; DROP TABLE x"])
    with pytest.raises(ValueError, match="unknown payment filters"):
        _sql.list_payments(["nope"])
    with pytest.raises(Exception, match="invalid queue name"):
        _sql.queue_table('x"; DROP TABLE y; --')


def test_unknown_role_has_no_permission() -> None:
    assert permissions_of("root") == frozenset()
    actor = Actor(1, "ana", "viewer", "t")
    assert actor.can(Permission.CUSTOMERS_READ) and not actor.can(Permission.CUSTOMERS_ACT)


def test_settings_key_rules_never_echo_the_key() -> None:
    with pytest.raises(ValueError, match="no session key"):
        ConsoleSettings().signing_key()
    with pytest.raises(ValueError, match="at least 32") as raised:
        ConsoleSettings(secret_key=SecretStr("short-secret")).signing_key()
    assert "short-secret" not in str(raised.value)
    assert "short-secret" not in repr(ConsoleSettings(secret_key=SecretStr("short-secret")))
    with pytest.raises(ValueError, match="placeholder"):  # the old example file's value: public, so refused
        ConsoleSettings(secret_key=SecretStr("change-me-change-me-change-me-change-me")).signing_key()


def _base(**extra: Any) -> dict[str, Any]:
    actor = Actor(1, "ana", "operator", "t")
    return {"actor": actor, "can": actor.can, "csrf_token": "tok", "flashes": [("ok", "<i>saved</i>")], "nav": [("Customers", "/customers")],
            "path": "/customers", "P": Permission, **extra}


def test_base_template_uses_the_base_context_and_escapes() -> None:
    assert set(_base()) == set(BASE_CONTEXT)
    html = _templates().get_template("error.html").render(_base(title="<b>t</b>", text="<script>x</script>"))
    assert "&lt;script&gt;x&lt;/script&gt;" in html and "<script>x" not in html
    assert "&lt;i&gt;saved&lt;/i&gt;" in html and 'data-user="ana"' in html and 'value="tok"' in html


def test_confirmation_page_carries_the_typed_values() -> None:
    customer = SimpleNamespace(service_id="c1", device="r1", method="pppoe", target="u1", desired_state="active")
    html = _templates().get_template("customers/confirm.html").render(
        _base(c=customer, form={"action": "suspend", "reason": 'unpaid "May"'}, url="/customers/c1", new_state="suspended"))
    assert 'name="reason" value="unpaid &#34;May&#34;"' in html and 'name="confirm" value="yes"' in html
