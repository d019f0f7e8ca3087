"""The database roles of the deployment, one per service, created (or their password updated) by a migrate step.

Usage, as the owner role (wl_migrate, the superuser of the compose stack), after the migrations:
    python roles.py worker     # migrate (wl-workers' image): wl_worker
    python roles.py webhook    # migrate-webhook (payment-webhook's image): wl_webhook
    python roles.py console    # the console's migrate step: wl_console
Each role's password is read from ``$ROLE_SECRETS_DIR/<role>`` (default /run/secrets, compose secrets): never
from the environment, never logged. Running it again re-applies the grants (new tables of later migrations) and
sets the password from the file (that is how a password is rotated: docs/operations.md).

What each role may do (CONTRACT.md, docs/operations.md "Database roles"):
- wl_worker: what ``pg-worker install --grant`` gives on its queues, plus reading and writing the ``wl`` schema.
- wl_webhook: its own ``webhook`` schema, sending to the queues it enqueues into (insert, and reading back the new
  message's id), and ``wl.service_exists()``; nothing else of ``wl`` (not the devices' rows).
- wl_console: its ``console`` schema, reading ``wl`` and ``webhook`` (customers, routers, payments), appending to
  ``wl.service_history`` (the operator's actions), sending to both queues, reading their messages (queue pages) and
  reading and deleting their dead letters (replay, purge); never consuming a job, never writing desired state.
Only the standard library, psycopg and pg_worker: it runs in the images of wl-workers and payment-webhook alike.
"""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

import pg_worker


@dataclass(frozen=True)
class Role:
    name: str
    worker_queues: tuple[str, ...] = ()  # consumes (pg-worker's grant)
    send_queues: tuple[str, ...] = ()  # only sends
    own_schemas: tuple[str, ...] = ()  # read and write every table
    read_schemas: tuple[str, ...] = ()  # read every table
    functions: tuple[str, ...] = ()  # EXECUTE, when the function exists
    append_tables: tuple[str, ...] = ()  # INSERT only (an append-only history), when the table exists
    inspect_queues: tuple[str, ...] = ()  # read the queue's messages; read and delete its dead letters


ROLES = {
    "worker": Role("wl_worker", worker_queues=("device_actions", "payment_sync"), own_schemas=("wl",)),
    "webhook": Role(
        "wl_webhook", send_queues=("device_actions", "payment_sync"), own_schemas=("webhook",), functions=("wl.service_exists(text)",)
    ),
    "console": Role(
        "wl_console", send_queues=("device_actions", "payment_sync"), own_schemas=("console",), read_schemas=("wl", "webhook"),
        append_tables=("wl.service_history",), inspect_queues=("device_actions", "payment_sync"),
    ),
}


class RoleSetupError(Exception):
    """A clear one-line reason the roles could not be set up."""


def read_password(role: str, secrets_dir: Path) -> str:
    path = secrets_dir / role
    try:
        password = path.read_text().strip()
    except OSError as exc:
        raise RoleSetupError(f"cannot read the password file of role {role}: {path}: {exc.strerror or exc}") from None
    if len(password) < 16:
        raise RoleSetupError(f"the password in {path} is shorter than 16 characters")
    return password


async def _schema_exists(conn: psycopg.AsyncConnection[tuple[object, ...]], schema: str) -> bool:
    cur = await conn.execute("SELECT to_regnamespace(%s) IS NOT NULL", (schema,))
    row = await cur.fetchone()
    return bool(row and row[0])


async def _apply(conn: psycopg.AsyncConnection[tuple[object, ...]], role: Role, password: str) -> list[str]:
    ident = sql.Identifier(role.name)
    done: list[str] = []
    # the statement carries the password: keep it out of the server's log whatever log_statement says
    await conn.execute("SET LOCAL log_statement = 'none'")
    cur = await conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role.name,))
    verb = "ALTER" if await cur.fetchone() else "CREATE"
    await conn.execute(
        sql.SQL("{} ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT PASSWORD {}").format(
            sql.SQL(verb), ident, sql.Literal(password)
        )
    )
    done.append(f"{verb.lower()}d role {role.name}")
    for schema in role.own_schemas + role.read_schemas:
        if not await _schema_exists(conn, schema):
            done.append(f"schema {schema} absent: skipped")
            continue
        rights = "SELECT, INSERT, UPDATE, DELETE" if schema in role.own_schemas else "SELECT"
        await conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(schema), ident))
        await conn.execute(
            sql.SQL("GRANT " + rights + " ON ALL TABLES IN SCHEMA {} TO {}").format(sql.Identifier(schema), ident)
        )
        if schema in role.own_schemas:
            await conn.execute(
                sql.SQL("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {} TO {}").format(sql.Identifier(schema), ident)
            )
        done.append(f"{rights} on {schema}")
    for queue in role.send_queues:
        table = sql.Identifier("q_" + queue)
        await conn.execute(sql.SQL("GRANT USAGE ON SCHEMA pgmq TO {}").format(ident))
        # pgmq.send inserts and returns the new msg_id (RETURNING needs SELECT on that column, and only that)
        await conn.execute(sql.SQL("GRANT INSERT, SELECT (msg_id) ON pgmq.{} TO {}").format(table, ident))
        await conn.execute(sql.SQL("GRANT USAGE ON SEQUENCE pgmq.{} TO {}").format(sql.Identifier(f"q_{queue}_msg_id_seq"), ident))
        await conn.execute(sql.SQL("GRANT SELECT ON pgmq.meta TO {}").format(ident))
        done.append(f"send to {queue}")
    for qualified in role.append_tables:
        cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (qualified,))
        row = await cur.fetchone()
        if row and row[0]:
            schema, name = qualified.split(".", 1)
            await conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(schema), ident))
            await conn.execute(sql.SQL("GRANT INSERT ON {}.{} TO {}").format(sql.Identifier(schema), sql.Identifier(name), ident))
            done.append(f"append to {qualified}")
    for queue in role.inspect_queues:
        await conn.execute(sql.SQL("GRANT USAGE ON SCHEMA pgmq TO {}").format(ident))
        await conn.execute(sql.SQL("GRANT SELECT ON pgmq.{} TO {}").format(sql.Identifier("q_" + queue), ident))
        dlq = sql.Identifier(f"q_{pg_worker.dlq_name(queue)}")
        cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"pgmq.q_{pg_worker.dlq_name(queue)}",))
        row = await cur.fetchone()
        if row and row[0]:
            await conn.execute(sql.SQL("GRANT SELECT, DELETE ON pgmq.{} TO {}").format(dlq, ident))
        done.append(f"inspect {queue} and its dead letters")
    for function in role.functions:
        cur = await conn.execute("SELECT to_regprocedure(%s) IS NOT NULL", (function,))
        row = await cur.fetchone()
        if row and row[0]:
            schema = function.split(".", 1)[0]
            await conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(schema), ident))
            await conn.execute(sql.SQL("GRANT EXECUTE ON FUNCTION " + function + " TO {}").format(ident))
            done.append(f"execute {function}")
    return done


async def setup(conninfo: str, which: list[str], secrets_dir: Path) -> list[str]:
    """Creates or updates the roles named in ``which`` (keys of ROLES); returns what was done (no secrets)."""
    unknown = [w for w in which if w not in ROLES]
    if unknown or not which:
        raise RoleSetupError(f"roles.py: expected some of {', '.join(ROLES)}; got {' '.join(which) or 'nothing'}")
    roles = [ROLES[w] for w in which]
    passwords = {r.name: read_password(r.name, secrets_dir) for r in roles}
    done: list[str] = []
    async with await psycopg.AsyncConnection.connect(conninfo) as conn, conn.transaction():
        # one setup at a time (two migrate steps may run at once)
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('widelink roles'))")
        for role in roles:
            done += await _apply(conn, role, passwords[role.name])
    for role in roles:
        if role.worker_queues:  # pg-worker's own grant: the queue tables, archives, DLQs, waiting marks
            await pg_worker.install(conninfo, list(role.worker_queues), grant_to=[role.name])
            done.append(f"pg-worker grant on {', '.join(role.worker_queues)}")
    return done


def main(argv: list[str]) -> int:
    conninfo = os.environ.get("DATABASE_URL", "")
    secrets_dir = Path(os.environ.get("ROLE_SECRETS_DIR", "/run/secrets"))
    try:
        if not conninfo:
            raise RoleSetupError("roles.py: set DATABASE_URL (the owner role's connection)")
        done = asyncio.run(setup(conninfo, argv, secrets_dir))
    except (RoleSetupError, psycopg.Error) as exc:
        print(f"roles: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}", file=sys.stderr)
        return 1
    print("roles: " + "; ".join(done), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
