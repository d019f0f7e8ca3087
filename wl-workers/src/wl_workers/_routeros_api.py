"""The RouterOS binary API (port 8728, 8729 with TLS; for v6 routers without REST), as a :class:`MenuApi`.

The protocol is small and documented by MikroTik ("API" in the RouterOS manual): a sentence is a list of
length-prefixed words ended by an empty word; a reply is ``!re`` sentences (one per item), ``!trap`` (an error,
still followed by ``!done``), ``!done``, or ``!fatal`` (the router closes the session). Login (v6.43+) sends the
name and password in ``/login``. Implemented here on asyncio streams rather than through a library: the only
fitting one, ``routeros-api`` (MIT), is synchronous, and ``librouteros`` is GPL-2.0-or-later, which our
Apache-2.0 distribution cannot take.
"""

from __future__ import annotations

import asyncio
import ssl

from ._store import Device
from .drivers import PermanentDeviceError, Timeouts, TransientDeviceError, _is_cert_error

Reply = list[tuple[str, dict[str, str]]]


def encode_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    if n < 0x4000:
        return (n | 0x8000).to_bytes(2, "big")
    if n < 0x200000:
        return (n | 0xC00000).to_bytes(3, "big")
    if n < 0x10000000:
        return (n | 0xE0000000).to_bytes(4, "big")
    return b"\xf0" + n.to_bytes(4, "big")


def encode_sentence(words: list[str]) -> bytes:
    out = bytearray()
    for word in words:
        data = word.encode()
        out += encode_length(len(data)) + data
    return bytes(out + b"\x00")


class ProtocolError(ValueError):
    """Bytes that are not the RouterOS API: a control byte (0xF1-0xFF, reserved), another service on the port."""


def decode_length_prefix(first: int) -> int:
    """How many more bytes follow the first byte of a length."""
    if first < 0x80:
        return 0
    if first < 0xC0:
        return 1
    if first < 0xE0:
        return 2
    if first < 0xF0:
        return 3
    if first > 0xF0:
        raise ProtocolError(f"control byte 0x{first:02X} where a word length was expected")
    return 4


def decode_length(first: int, rest: bytes) -> int:
    if first > 0xF0:
        raise ProtocolError(f"control byte 0x{first:02X} where a word length was expected")
    if first == 0xF0:
        return int.from_bytes(rest, "big")
    masks = {0: 0x7F, 1: 0x3F, 2: 0x1F, 3: 0x0F}
    value = first & masks[len(rest)]
    for byte in rest:
        value = (value << 8) | byte
    return value


async def read_sentence(reader: asyncio.StreamReader) -> list[str]:
    words: list[str] = []
    while True:
        first = (await reader.readexactly(1))[0]
        length = decode_length(first, await reader.readexactly(decode_length_prefix(first)))
        if length == 0:
            return words
        words.append((await reader.readexactly(length)).decode(errors="replace"))


def attributes(words: list[str]) -> dict[str, str]:
    attrs = {}
    for word in words:
        if word.startswith("="):
            key, _, value = word[1:].partition("=")
            attrs[key] = value
    return attrs


def _tls_context(device: Device) -> ssl.SSLContext | None:
    if device.scheme != "https":
        return None
    if device.tls_insecure:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    try:
        return ssl.create_default_context(cafile=device.ca_file) if device.ca_file else ssl.create_default_context()
    except (OSError, ssl.SSLError) as exc:
        raise PermanentDeviceError(f"cannot load CA file {device.ca_file}: {exc}") from exc


class BinaryApi:
    """One API session per driver (per action): connect and log in on first use, close at the end."""

    def __init__(self, device: Device, password: str, timeouts: Timeouts) -> None:
        self._device = device
        self._password = password
        self._timeouts = timeouts
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def aclose(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), timeout=1.0)
            except (OSError, TimeoutError):
                pass  # closing a broken connection: nothing left to tell the router

    async def _session(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is not None and self._writer is not None:
            return self._reader, self._writer
        device = self._device
        context = _tls_context(device)
        port = device.port or (8729 if context else 8728)
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(device.host, port, ssl=context, server_hostname=device.host if context else None), timeout=self._timeouts.connect
            )
        except TimeoutError as exc:
            raise TransientDeviceError("timeout (connect)") from exc
        except OSError as exc:
            if _is_cert_error(exc):
                raise PermanentDeviceError(f"TLS certificate does not verify: {exc}") from exc
            raise TransientDeviceError(f"connection failed ({type(exc).__name__}: {exc})") from exc
        reply = await self._exchange(["/login", f"=name={device.username}", f"=password={self._password}"])
        traps = [attrs for kind, attrs in reply if kind == "!trap"]
        if traps:
            raise PermanentDeviceError(f"authentication failed ({traps[0].get('message', 'login refused')}): check the device's username and password")
        assert self._reader is not None and self._writer is not None
        return self._reader, self._writer

    async def _exchange(self, words: list[str]) -> Reply:
        assert self._reader is not None and self._writer is not None
        reply: Reply = []
        try:
            self._writer.write(encode_sentence(words))
            await asyncio.wait_for(self._writer.drain(), timeout=self._timeouts.read)
            while True:
                sentence = await asyncio.wait_for(read_sentence(self._reader), timeout=self._timeouts.read)
                if not sentence:
                    continue
                kind, attrs = sentence[0], attributes(sentence[1:])
                if kind == "!fatal":
                    raise TransientDeviceError(f"router closed the API session: {' '.join(sentence[1:]) or 'no reason'}")
                reply.append((kind, attrs))
                if kind == "!done":
                    return reply
        except TimeoutError as exc:
            await self.aclose()
            raise TransientDeviceError("timeout (read)") from exc
        except (OSError, asyncio.IncompleteReadError) as exc:
            await self.aclose()
            raise TransientDeviceError(f"connection failed ({type(exc).__name__})") from exc
        except ProtocolError as exc:  # the session is out of step: a new one may be fine
            await self.aclose()
            raise TransientDeviceError(f"device {self._device.name} answered something that is not the RouterOS API: {exc}") from exc
        except TransientDeviceError:
            await self.aclose()
            raise

    async def _command(self, words: list[str]) -> Reply:
        await self._session()
        return await self._exchange(words)

    @staticmethod
    def _trap(reply: Reply) -> str | None:
        for kind, attrs in reply:
            if kind == "!trap":
                return attrs.get("message", "unknown error")
        return None

    async def print(self, menu: str, **filters: str) -> list[dict[str, str]]:
        reply = await self._command([f"/{menu}/print", *(f"?{k}={v}" for k, v in filters.items())])
        trap = self._trap(reply)
        if trap:
            raise PermanentDeviceError(f"device rejected print of {menu}: {trap}")
        return [attrs for kind, attrs in reply if kind == "!re"]

    async def add(self, menu: str, values: dict[str, str]) -> None:
        trap = self._trap(await self._command([f"/{menu}/add", *(f"={k}={v}" for k, v in values.items())]))
        if trap and "already have such entry" not in trap:
            raise PermanentDeviceError(f"device rejected the new entry in {menu}: {trap}")

    async def set(self, menu: str, item_id: str, values: dict[str, str]) -> bool:
        trap = self._trap(await self._command([f"/{menu}/set", f"=.id={item_id}", *(f"={k}={v}" for k, v in values.items())]))
        if trap is None:
            return True
        if "no such item" in trap:
            return False
        raise PermanentDeviceError(f"device rejected the change of {menu}: {trap}")

    async def remove(self, menu: str, item_id: str) -> None:
        trap = self._trap(await self._command([f"/{menu}/remove", f"=.id={item_id}"]))
        if trap and "no such item" not in trap:
            raise PermanentDeviceError(f"device rejected the removal from {menu}: {trap}")
