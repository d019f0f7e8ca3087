"""Loading docker-compose.yml the way Compose v2 does, for checks that cannot run Docker."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"


def load(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


def _rebase(volume: Any, base: Path, root: Path) -> Any:
    """A short-syntax bind mount relative to an included file, made relative to the project directory."""
    if isinstance(volume, str) and volume.startswith("./"):
        source, _, rest = volume.partition(":")
        return f"./{(base / source).resolve().relative_to(root.resolve())}:{rest}"
    return volume


def flattened(root: Path = ROOT) -> dict[str, Any]:
    """The compose model with its ``include:`` files merged in (paths rebased), as Compose v2.20+ builds it.

    Debian's docker-compose 1.29 predates ``include``; this is what lets it validate the same model.
    """
    model = load(root / "docker-compose.yml")
    for entry in model.pop("include", []):
        path = root / (entry if isinstance(entry, str) else entry["path"])
        included = load(path)
        for name, service in included.get("services", {}).items():
            assert name not in model["services"], f"{name} is defined twice"
            service["volumes"] = [_rebase(v, path.parent, root) for v in service.get("volumes", [])]
            model["services"][name] = service
        for section in ("volumes", "networks", "secrets"):
            for name, value in (included.get(section) or {}).items():
                model.setdefault(section, {}).setdefault(name, value)
    return model


def example_project(dest: Path) -> Path:
    """A copy of the project as a newcomer prepares it: every ``*.example`` copied to its real name."""
    shutil.copytree(ROOT / "deploy", dest / "deploy")
    shutil.copyfile(ROOT / ".env.example", dest / ".env")
    for example in dest.joinpath("deploy").rglob("*.example"):
        shutil.copyfile(example, example.with_suffix(""))
    (dest / "docker-compose.yml").write_text(yaml.safe_dump(flattened(), sort_keys=False))
    return dest
