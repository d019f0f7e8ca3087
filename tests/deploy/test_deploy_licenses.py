"""License: the repository is Apache-2.0, and no runtime dependency of our packages has a license that forbids it."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.deploy.licenses import ALLOWED_PACKAGES, canonical, is_compatible, refused

ROOT = Path(__file__).resolve().parents[2]
PYPROJECTS = sorted(ROOT.glob("*/pyproject.toml"))


def _our_distributions() -> list[str]:
    return [tomllib.loads(p.read_text())["project"]["name"] for p in PYPROJECTS]


def runtime_closure(roots: list[str]) -> set[str]:
    """Every installed distribution our packages need at run time (their extras not included, markers honoured)."""
    seen: set[str] = set()
    todo: list[tuple[str, frozenset[str]]] = [(name, frozenset()) for name in roots]
    while todo:
        name, extras = todo.pop()
        key = canonical(name)
        dist = importlib.metadata.distribution(name)
        if key in seen and not extras:
            continue
        seen.add(key)
        for line in dist.requires or []:
            req = Requirement(line)
            envs = [{"extra": e} for e in extras] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, frozenset(req.extras)))
    return seen


def test_license_file_is_apache_2() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a stub


@pytest.mark.parametrize("pyproject", PYPROJECTS, ids=lambda p: p.parent.name)
def test_every_package_declares_apache_2(pyproject: Path) -> None:
    assert tomllib.loads(pyproject.read_text())["project"].get("license") == "Apache-2.0"


def test_runtime_dependencies_have_compatible_licenses() -> None:
    names = sorted(runtime_closure(_our_distributions()))
    assert "psycopg" in names and "pgmq" in names  # the closure really walked our dependencies
    result = subprocess.run(
        [sys.executable, "-m", "piplicenses", "--from=mixed", "--format=json", "--packages", *names],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    reported = {canonical(p["Name"]): p["License"] for p in json.loads(result.stdout)}
    assert set(reported) >= {n for n in names if not n.startswith("widelink-")}, "pip-licenses missed some"
    assert refused(reported.items()) == []


@pytest.mark.parametrize(
    ("expression", "ok"),
    [
        ("MIT", True),
        ("MIT License", True),
        ("MPL-2.0 AND (Apache-2.0 OR MIT)", True),
        ("Apache-2.0 OR BSD-2-Clause", True),
        ("MIT OR Apache-2.0", True),
        ("DFSG approved; MIT License", True),
        ("GPL-2.0-or-later", False),  # librouteros 4.2.2: must never become a runtime dependency
        ("MIT AND GPL-3.0-only", False),
        ("GPL-3.0-only OR MIT", True),  # dual licensed: we take MIT
        ("LGPL-3.0-only", False),  # only through the commented allow-list
        ("AGPL-3.0-or-later", False),
        ("GNU General Public License v2 or later (GPLv2+)", False),
        ("UNKNOWN", False),
        ("", False),
        ("(MIT", False),
    ],
)
def test_license_classifier(expression: str, ok: bool) -> None:
    assert is_compatible(expression) is ok


def test_refused_names_the_package_unless_allow_listed() -> None:
    assert refused([("librouteros", "GPL-2.0-or-later"), ("routeros-api", "MIT")]) == [
        "librouteros: 'GPL-2.0-or-later'"
    ]
    assert refused([("psycopg", "LGPL-3.0-only")]) == []
    assert all(reason for reason in ALLOWED_PACKAGES.values())
