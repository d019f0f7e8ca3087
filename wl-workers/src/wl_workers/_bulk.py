"""``wl-workers import`` / ``export``: devices or services as CSV, all rows or none.

The kind of a file comes from its header (``service_id`` = services, ``name`` = devices). Every row is checked
before anything is written, and then all of them are written in one transaction: a bad row is reported with its
line number and nothing is imported. Importing the same file twice changes nothing the second time (rows equal to
the database are "unchanged"); ``--dry-run`` runs the same transaction and rolls it back.

A service's ``desired_state`` column is used only when the service is added: afterwards the desired state is the
business events' (activate/deactivate), never a file's.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import Any

import psycopg

from . import _operator
from ._operator import OperatorError
from ._store import STATES, NotFound, add_device, get_device, get_service, list_devices, list_services

AConn = psycopg.AsyncConnection[Any]

DEVICE_FIELDS = ("name", "driver", "host", "port", "scheme", "ca_file", "tls_insecure", "username", "password_ref", "max_concurrent", "address_list", "own_entries_only")
DEVICE_REQUIRED = ("name", "host", "username", "password_ref")
SERVICE_FIELDS = ("service_id", "device", "method", "target", "desired_state")
SERVICE_REQUIRED = ("service_id", "device", "method", "target")
DEVICE_DEFAULTS: dict[str, Any] = {"driver": "routeros-rest", "port": None, "scheme": "https", "ca_file": None, "tls_insecure": False, "max_concurrent": 2, "address_list": "morosos", "own_entries_only": True}
MAX_ROWS = 100_000


@dataclass
class ImportReport:
    kind: str
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    changes: list[str] = field(default_factory=list)


def _read(path: str) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            text = handle.read()
    except OSError as exc:
        raise OperatorError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise OperatorError(f"{path} is not UTF-8 text") from None
    reader = csv.DictReader(io.StringIO(text), strict=True)
    rows: list[tuple[int, dict[str, str]]] = []
    try:
        header = [h.strip() for h in reader.fieldnames or []]
        reader.fieldnames = header
        for row in reader:
            if None in row:
                raise OperatorError(f"{path} line {reader.line_num}: more values than the header has columns")
            if len(rows) >= MAX_ROWS:
                raise OperatorError(f"{path}: more than {MAX_ROWS} rows; split the file")
            rows.append((reader.line_num, {k: (v or "").strip() for k, v in row.items()}))
    except csv.Error as exc:
        raise OperatorError(f"{path} line {reader.line_num}: not valid CSV ({exc})") from None
    return header, rows


def _kind(path: str, header: list[str]) -> str:
    known: tuple[str, ...]
    required: tuple[str, ...]
    if "service_id" in header:
        kind, known, required = "services", SERVICE_FIELDS, SERVICE_REQUIRED
    elif "name" in header:
        kind, known, required = "devices", DEVICE_FIELDS, DEVICE_REQUIRED
    else:
        raise OperatorError(f"{path} line 1: the header needs service_id (services) or name (devices), got {','.join(header) or 'nothing'}")
    unknown = [h for h in header if h not in known]
    missing = [r for r in required if r not in header]
    if unknown or missing:
        problems = ([f"unknown column(s) {', '.join(unknown)}"] if unknown else []) + ([f"missing column(s) {', '.join(missing)}"] if missing else [])
        raise OperatorError(f"{path} line 1: {'; '.join(problems)} (columns: {','.join(known)})")
    return kind


def _device_row(row: dict[str, str]) -> dict[str, Any]:
    fields: dict[str, Any] = dict(DEVICE_DEFAULTS)
    for key, value in row.items():
        if value == "":
            continue
        if key in ("port", "max_concurrent"):
            try:
                fields[key] = int(value)
            except ValueError:
                raise OperatorError(f"{key} must be a whole number, got {value!r}") from None
        elif key in ("tls_insecure", "own_entries_only"):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise OperatorError(f"{key} must be true or false, got {value!r}")
            fields[key] = value.lower() in ("true", "1", "yes")
        else:
            fields[key] = value
    return _operator.device_fields(fields)


def _service_row(row: dict[str, str]) -> dict[str, Any]:
    service_id = _operator.validate_service_id(row["service_id"])
    method = row["method"]
    state = row.get("desired_state") or "active"
    if state not in STATES:
        raise OperatorError(f"desired_state must be active or suspended, got {state!r}")
    return {"service_id": service_id, "device": row["device"], "method": method, "target": _operator.checked_target(method, row["target"]), "desired_state": state}


def _checked(path: str, kind: str, rows: list[tuple[int, dict[str, str]]]) -> list[tuple[int, dict[str, Any]]]:
    """Every row validated, duplicates (regardless of case) refused; the first bad row raises, with its line."""
    key = "service_id" if kind == "services" else "name"
    seen: dict[str, int] = {}
    checked = []
    for line, row in rows:
        label = f"{path} line {line}" + (f" ({key} {row.get(key)})" if row.get(key) else "")
        try:
            fields = _service_row(row) if kind == "services" else _device_row(row)
        except (OperatorError, ValueError) as exc:
            raise OperatorError(f"{label}: {exc}") from None
        folded = str(fields[key]).lower()
        if folded in seen:
            raise OperatorError(f"{label}: the same {key} as line {seen[folded]}")
        seen[folded] = line
        checked.append((line, fields))
    return checked


async def _import_device(conn: AConn, fields: dict[str, Any], report: ImportReport, actor: str) -> None:
    try:
        device = await get_device(conn, fields["name"])
    except NotFound:
        await add_device(conn, **fields)
        report.added += 1
        report.changes.append(f"add device {fields['name']} ({fields['host']})")
        return
    current = device.public()
    changed = {k: fields[k] for k in DEVICE_FIELDS if k != "name" and current[k] != fields[k]}
    if not changed:
        report.unchanged += 1
        return
    before, after = await _operator.update_device(conn, fields["name"], changed, actor=actor)
    report.updated += 1
    report.changes.append(f"update device {fields['name']}: " + ", ".join(f"{k} {before[k]} -> {after[k]}" for k in after))


async def _import_service(conn: AConn, fields: dict[str, Any], report: ImportReport, actor: str, reason: str) -> None:
    service_id = fields["service_id"]
    try:
        service = await get_service(conn, service_id)
    except NotFound:
        await _operator.add_service(
            conn, service_id, fields["device"], fields["method"], fields["target"], fields["desired_state"], actor=actor, reason=reason
        )
        report.added += 1
        report.changes.append(f"add service {service_id} on {fields['device']} ({fields['method']} {fields['target']})")
        return
    if (service.device, service.method, service.target) == (fields["device"], fields["method"], fields["target"]):
        report.unchanged += 1
        return
    change = await _operator.update_service(
        conn, service_id, device=fields["device"], method=fields["method"], target=fields["target"], force=False, actor=actor, reason=reason
    )
    report.updated += 1
    report.changes.extend(change.effects)


async def import_csv(conn: AConn, path: str, *, dry_run: bool, actor: str) -> ImportReport:
    header, rows = _read(path)
    kind = _kind(path, header)
    checked = _checked(path, kind, rows)
    report = ImportReport(kind)
    key = "service_id" if kind == "services" else "name"
    async with conn.transaction(force_rollback=dry_run):
        for line, fields in checked:
            try:
                if kind == "devices":
                    await _import_device(conn, fields, report, actor)
                else:
                    await _import_service(conn, fields, report, actor, f"import {path}")
            except (OperatorError, NotFound, ValueError) as exc:
                raise OperatorError(f"{path} line {line} ({key} {fields[key]}): {exc}; nothing imported") from None
    return report


async def export_csv(conn: AConn, what: str) -> str:
    out = io.StringIO()
    if what == "devices":
        writer = csv.DictWriter(out, DEVICE_FIELDS, lineterminator="\n")
        writer.writeheader()
        for device in await list_devices(conn):
            row = device.public()
            writer.writerow({k: "" if row[k] is None else str(row[k]).lower() if isinstance(row[k], bool) else row[k] for k in DEVICE_FIELDS})
    else:
        writer = csv.DictWriter(out, SERVICE_FIELDS, lineterminator="\n")
        writer.writeheader()
        for service in await list_services(conn):
            writer.writerow({k: getattr(service, k) for k in SERVICE_FIELDS})
    return out.getvalue()
