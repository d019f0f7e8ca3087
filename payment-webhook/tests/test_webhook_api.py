"""The public API is what ``__all__`` says."""

from __future__ import annotations

import payment_webhook


def test_exported_members() -> None:
    public = {name for name in dir(payment_webhook) if not name.startswith("_")}
    modules = {"cli", "metrics", "settings"}
    assert public - modules == set(payment_webhook.__all__)
