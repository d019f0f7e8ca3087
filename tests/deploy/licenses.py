"""Which licenses our runtime dependencies may have: a small SPDX-expression classifier and the allow-list.

The repository is Apache-2.0 (LICENSE, docs/decisions.md). A runtime dependency is shipped in our images, so its
license must allow that: permissive licenses always do; weak copyleft (MPL-2.0 per file, LGPL for an unmodified,
separately installed library) does; strong copyleft (GPL, AGPL, SSPL, ...) does not.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

PERMISSIVE = frozenset(
    {
        "0BSD", "Apache-2.0", "BSD-2-Clause", "BSD-3-Clause", "ISC", "MIT", "MIT-0", "PSF-2.0", "Python-2.0",
        "Unlicense", "Zlib", "CC0-1.0", "HPND",
    }
)  # fmt: skip
# File-level copyleft: using the library unmodified puts no obligation on our code.
WEAK_COPYLEFT = frozenset({"MPL-2.0"})
FORBIDDEN_PREFIXES = ("GPL", "AGPL", "LGPL", "SSPL", "EUPL", "CC-BY-SA", "OSL", "CPAL")

# The names that trove classifiers and free-text License fields use, mapped to SPDX ids.
ALIASES = {
    "MIT License": "MIT",
    "BSD License": "BSD-3-Clause",
    "Apache Software License": "Apache-2.0",
    "Apache License 2.0": "Apache-2.0",
    "Mozilla Public License 2.0 (MPL 2.0)": "MPL-2.0",
    "Python Software Foundation License": "PSF-2.0",
    "ISC License (ISCL)": "ISC",
    "The Unlicense (Unlicense)": "Unlicense",
    "GNU General Public License v2 or later (GPLv2+)": "GPL-2.0-or-later",
    "GNU General Public License v3 (GPLv3)": "GPL-3.0-only",
    "GNU Lesser General Public License v3 (LGPLv3)": "LGPL-3.0-only",
    "GNU Affero General Public License v3": "AGPL-3.0-only",
}

# Packages whose license is fine although the rule above would refuse it (or cannot read it). Each line says why.
ALLOWED_PACKAGES = {
    # LGPL-3.0-only. psycopg is the PostgreSQL driver; we import it unmodified and ship it as its own wheel in the
    # image, where it can be replaced: LGPL-3.0 section 4 is met, and our code stays Apache-2.0.
    "psycopg": "LGPL-3.0-only, unmodified library, replaceable in the image",
    "psycopg-binary": "LGPL-3.0-only, psycopg's compiled part, same terms",
    "psycopg-pool": "LGPL-3.0-only, psycopg's pool, same terms",
}

_TOKEN = re.compile(r"\(|\)|\bAND\b|\bOR\b|\bWITH\b|[^\s()]+")


def normalize(text: str) -> str:
    """The SPDX expression for a license field or a '; '-joined list of classifier names."""
    text = text.strip()
    parts = [p.strip() for p in text.split(";") if p.strip() and p.strip() != "DFSG approved"]
    if len(parts) > 1 or (parts and parts[0] in ALIASES):
        # Several classifiers name the licenses one may choose from (dual licensing).
        return " OR ".join(f"({ALIASES.get(p, p)})" for p in parts)
    return parts[0] if parts else ""


def _allowed_id(spdx_id: str) -> bool:
    if spdx_id.startswith(FORBIDDEN_PREFIXES):
        return False
    return spdx_id in PERMISSIVE or spdx_id in WEAK_COPYLEFT


def is_compatible(expression: str) -> bool:
    """Whether an SPDX expression allows shipping the package with Apache-2.0 code (unknown ids: no)."""
    tokens = _TOKEN.findall(normalize(expression))
    if not tokens:
        return False
    pos = 0

    def term() -> bool:
        nonlocal pos
        if tokens[pos] == "(":
            pos += 1
            value = disjunction()
            if pos >= len(tokens) or tokens[pos] != ")":
                raise ValueError(f"unbalanced license expression: {expression!r}")
            pos += 1
            return value
        spdx_id = tokens[pos]
        pos += 1
        if pos < len(tokens) and tokens[pos] == "WITH":  # an exception only widens what the license allows
            pos += 2
        return _allowed_id(spdx_id)

    def conjunction() -> bool:
        nonlocal pos
        value = term()
        while pos < len(tokens) and tokens[pos] == "AND":
            pos += 1
            value = term() and value
        return value

    def disjunction() -> bool:
        nonlocal pos
        value = conjunction()
        while pos < len(tokens) and tokens[pos] == "OR":
            pos += 1
            value = conjunction() or value
        return value

    try:
        result = disjunction()
    except (IndexError, ValueError):  # a malformed expression is not a license we can accept
        return False
    return result and pos == len(tokens)


def refused(packages: Iterable[tuple[str, str]]) -> list[str]:
    """'name: license' for every (name, license) pair that is neither compatible nor allow-listed."""
    return sorted(
        f"{name}: {text!r}"
        for name, text in packages
        if canonical(name) not in ALLOWED_PACKAGES and not is_compatible(text)
    )


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()
