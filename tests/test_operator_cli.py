"""What an operator reads and types across the three commands (issue 16): --help in plain text with every option
explained, every command line in the READMEs and docs accepted by the command it names, and one-line errors from
payment-webhook (a database that is down, a malformed URL, a secret that is not base64)."""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from payment_webhook.cli import _parser as webhook_parser
from payment_webhook.cli import main as webhook_main
from pg_worker.cli import build_parser as pg_worker_parser
from wl_workers.cli import build_parser as wl_parser

REPO = Path(__file__).resolve().parent.parent
PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {"wl-workers": wl_parser, "pg-worker": pg_worker_parser, "payment-webhook": webhook_parser}
DOCS = [REPO / "README.md", *REPO.glob("*/README.md"), *(REPO / "docs").glob("*.md")]


def _walk(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, f"{path} {name}")


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_help_is_plain_text_and_explains_every_option(command: str) -> None:
    undocumented, marked = [], []
    for path, parser in _walk(PARSERS[command](), command):
        if "``" in parser.format_help():
            marked.append(path)
        for action in parser._actions:
            if action.help is None and not isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                undocumented.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    assert not undocumented, f"options without help: {undocumented}"
    assert not marked, f"reST markup in --help of: {marked}"


def _command_lines() -> Iterator[tuple[str, str]]:
    """(where, command line) for each wl-workers / pg-worker / payment-webhook call in a sh block of the docs."""
    for doc in DOCS:
        in_block = False
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            if line.startswith("```"):
                in_block = line.strip() in ("```sh", "```bash", "```console")
                continue
            if not in_block:
                continue
            text = _synopsis_to_example(line.split("  #", 1)[0].split(" # ", 1)[0].strip())
            text = re.sub(r"\s[<>]\s*\S+", "", text)  # redirections
            for part in re.split(r"\s*(?:&&|;|\|\||(?<![|])\|(?![|])|&)\s*", text):
                words = part.split()
                while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # VAR=value prefixes
                    words.pop(0)
                if words and words[0] in PARSERS:
                    yield f"{doc.relative_to(REPO)}:{number}", " ".join(words)


def _synopsis_to_example(line: str) -> str:
    """Usage notation in the docs ('[--json]', '(ID... | --all)', 'ID...') made into one concrete call."""
    line = re.sub(r"\[[^\[\]]*\]", "", line)
    line = re.sub(r"\(([^()|]*)\|[^()]*\)", r"\1", line)
    return line.replace("...", "")


PLACEHOLDERS = {"QUEUE": "jobs", "DLQ_ID": "1", "ID": "cust-1001", "FILE.csv": "services.csv", "DAYS": "30"}


def test_every_command_line_in_the_docs_is_accepted() -> None:
    lines = list(_command_lines())
    assert len(lines) > 40, "the docs' command lines were found"
    refused = []
    for where, line in lines:
        words = [PLACEHOLDERS.get(w, w) for w in shlex.split(line)]
        try:
            PARSERS[words[0]]().parse_args(words[1:])
        except SystemExit:
            refused.append(f"{where}: {line}")
    assert not refused, "command lines in the docs that the commands refuse:\n" + "\n".join(refused)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("postgresql://wl:hunter2@127.0.0.1:1/x?connect_timeout=2", "payment-webhook: cannot migrate postgresql://wl@127.0.0.1:1/x: connection failed"),
        ("postgresql://wl:hunter2@127.0.0.1:99999/x", "invalid port"),
        ("host=127.0.0.1 port", 'payment-webhook: DATABASE_URL is malformed: missing "=" after "port"'),
    ],
)
def test_payment_webhook_migrate_says_in_one_line_why_it_cannot(monkeypatch: pytest.MonkeyPatch, url: str, says: str) -> None:
    monkeypatch.delenv("WEBHOOK_DATABASE_URL", raising=False)
    monkeypatch.setenv("DATABASE_URL", url)
    with pytest.raises(SystemExit) as exited:
        webhook_main(["migrate"])
    message = str(exited.value.code)
    assert says in message and "\n" not in message and "hunter2" not in message, message


def test_a_standard_secret_that_is_not_base64_is_called_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEBHOOK_STANDARD_SECRETS", "whsec_!!!")
    monkeypatch.setenv("DATABASE_URL", "postgresql://x@127.0.0.1:1/x")
    with pytest.raises(SystemExit) as exited:
        webhook_main(["migrate"])
    message = str(exited.value.code)
    assert message.startswith("payment-webhook: bad settings: WEBHOOK_STANDARD_SECRETS: secret 1: a Standard Webhooks secret is not strict base64"), message
    assert "\n" not in message and "!!!" not in message and "empty" not in message, message
