"""Loading docker-compose.yml the way Compose v2 does, for checks that cannot run Docker."""

from __future__ import annotations

import copy
import json
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
            if "env_file" in service:
                service["env_file"] = [
                    str((path.parent / f).resolve().relative_to(root.resolve())) for f in service["env_file"]
                ]
            model["services"][name] = service
        for section in ("volumes", "networks", "secrets"):
            for name, value in (included.get(section) or {}).items():
                model.setdefault(section, {}).setdefault(name, value)
    return model


def for_compose_v1(model: dict[str, Any]) -> dict[str, Any]:
    """The model without the Compose v2 keys that Debian's docker-compose 1.29 does not know (top-level ``name``,
    ``restart``/``required`` in ``depends_on``); they are validated against the Compose v2 schema instead
    (:func:`schema_errors`)."""
    model = copy.deepcopy(model)
    model.pop("name", None)
    for service in model["services"].values():
        depends_on = service.get("depends_on") or {}
        for spec in depends_on.values() if isinstance(depends_on, dict) else ():
            if isinstance(spec, dict):
                spec.pop("restart", None)
                spec.pop("required", None)
    return model


def schema_errors(model: dict[str, Any]) -> str | None:
    """Why ``model`` breaks the Compose Specification's JSON schema (what Compose v2 validates against), or None.

    ``compose-spec.json`` is compose-spec/compose-spec's schema/compose-spec.json at commit 170098ba07d9 (Apache-2.0)."""
    import fastjsonschema

    validate = fastjsonschema.compile(json.loads((Path(__file__).with_name("compose-spec.json")).read_text()))
    try:
        validate(model)
    except fastjsonschema.JsonSchemaException as exc:
        return str(exc.message)
    return None


def example_project(dest: Path) -> Path:
    """A copy of the project as a newcomer prepares it: every ``*.example`` copied to its real name."""
    shutil.copytree(ROOT / "deploy", dest / "deploy")
    shutil.copyfile(ROOT / ".env.example", dest / ".env")
    for example in dest.joinpath("deploy").rglob("*.example"):
        shutil.copyfile(example, example.with_suffix(""))
    (dest / "docker-compose.yml").write_text(yaml.safe_dump(for_compose_v1(flattened()), sort_keys=False))
    return dest
