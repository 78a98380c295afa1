"""Migration addresses: QEMU's URI strings and its ``channels`` form, parsed into one dataclass each.

Both ``migrate`` and ``migrate-incoming`` accept either form; parsing them into the same objects keeps
every transport blind to how its address was spelled. Error texts are QEMU's, because management
layers match on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from migd.units import SizeError, parse_size


class URIError(ValueError):
    """A bad migration address; ``str()`` is QEMU's error text."""


@dataclass(frozen=True)
class TcpURI:
    host: str  # "" = every address (listen only); IPv6 without brackets
    port: int  # 0 = pick a free port (listen only)

    def display(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class UnixURI:
    path: str

    def display(self) -> str:
        return self.path


@dataclass(frozen=True)
class ExecURI:
    args: tuple[str, ...]  # argv; "exec:CMD" becomes ("/bin/sh", "-c", CMD) like QEMU

    def display(self) -> str:
        return " ".join(self.args)


@dataclass(frozen=True)
class FdURI:
    name: str  # a name given to getfd, or a decimal descriptor number inherited by the daemon

    def display(self) -> str:
        return self.name


@dataclass(frozen=True)
class FileURI:
    path: str
    offset: int = 0

    def display(self) -> str:
        return self.path


MigrationURI = TcpURI | UnixURI | ExecURI | FdURI | FileURI

UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL


def parse_uri(uri: str) -> MigrationURI:
    """Parse a ``-incoming`` / ``migrate`` URI string."""
    scheme, sep, rest = uri.partition(":")
    if not sep:
        raise URIError(f"unknown migration protocol: {uri}")
    if scheme == "tcp":
        return _parse_inet(rest)
    if scheme == "unix":
        return _unix(rest)
    if scheme == "exec":
        if not rest:
            raise URIError("exec: command is empty")
        return ExecURI(("/bin/sh", "-c", rest))
    if scheme == "fd":
        if not rest:
            raise URIError("File descriptor name is empty")
        return FdURI(rest)
    if scheme == "file":
        return _parse_file(rest)
    raise URIError(f"unknown migration protocol: {uri}")


def _unix(path: str) -> UnixURI:
    if not path:
        raise URIError("UNIX socket path is empty")
    if len(path.encode()) > UNIX_PATH_MAX:
        raise URIError(f"UNIX socket path '{path}' is too long")
    return UnixURI(path)


def _parse_inet(spec: str) -> TcpURI:
    """``HOST:PORT`` or ``[IPV6]:PORT``; QEMU's inet options after a comma are not supported."""
    if "," in spec:
        raise URIError(f"error parsing address '{spec}'")
    if spec.startswith("["):
        close = spec.find("]")
        if close < 0 or spec[close + 1 : close + 2] != ":":
            raise URIError(f"error parsing IPv6 address '{spec}'")
        host, port = spec[1:close], spec[close + 2 :]
    else:
        host, sep, port = spec.rpartition(":")
        if not sep or ":" in host:
            raise URIError(f"error parsing address '{spec}'")
    return TcpURI(host, _parse_port(port, spec))


def _parse_port(port: str | int, spec: str) -> int:
    if isinstance(port, int):
        value = port
    elif port.isascii() and port.isdigit():
        value = int(port)
    else:
        raise URIError(f"error parsing address '{spec}'")
    if not 0 <= value <= 65535:
        raise URIError(f"error parsing address '{spec}'")
    return value


def _parse_file(spec: str) -> FileURI:
    path, sep, option = spec.partition(",offset=")
    if not path:
        raise URIError("file: path is empty")
    if not sep:
        return FileURI(path)
    try:
        offset = parse_size(option)  # a bare number is bytes
    except SizeError:
        raise URIError(f"Invalid file offset {option}") from None
    return FileURI(path, offset)


def parse_channels(channels: list[Any], *, incoming: bool = False) -> MigrationURI:
    """The ``channels`` argument: exactly one ``main`` channel whose ``addr`` is a MigrationAddress."""
    if not isinstance(channels, list):
        raise URIError("Invalid parameter type for 'channels', expected: array")
    if incoming and len(channels) > 1:
        raise URIError("Channel list has more than one entries")
    main: dict[str, Any] | None = None
    for channel in channels:
        if not isinstance(channel, dict):
            raise URIError("Invalid parameter type for 'channels[0]', expected: object")
        kind = channel.get("channel-type")
        if kind not in ("main", "cpr"):
            raise URIError(f"Parameter 'channel-type' does not accept value '{kind}'")
        if kind == "cpr":
            raise URIError("cpr channels are not supported by migd")
        if main is not None:
            raise URIError("Channel list has more than one main entry")
        if set(channel) - {"channel-type", "addr"}:
            extra = sorted(set(channel) - {"channel-type", "addr"})[0]
            raise URIError(f"Parameter '{extra}' is unexpected")
        main = channel
    if main is None:
        raise URIError("Channel list has no main entry")
    addr = main.get("addr")
    if not isinstance(addr, dict):
        raise URIError("Parameter 'addr' is missing")
    return parse_address(addr)


def parse_address(addr: dict[str, Any]) -> MigrationURI:
    """One QAPI ``MigrationAddress`` (union on ``transport``)."""
    transport = addr.get("transport")
    if transport == "socket":
        kind = addr.get("type")
        if kind == "inet":
            host, port = addr.get("host"), addr.get("port")
            if not isinstance(host, str) or not isinstance(port, str):
                raise URIError("Parameter 'host' and 'port' must be strings")
            return TcpURI(host.strip("[]"), _parse_port(port, f"{host}:{port}"))
        if kind == "unix":
            path = addr.get("path")
            if not isinstance(path, str):
                raise URIError("Parameter 'path' is missing")
            return _unix(path)
        if kind == "fd":
            name = addr.get("str")
            if not isinstance(name, str) or not name:
                raise URIError("Parameter 'str' is missing")
            return FdURI(name)
        raise URIError(f"Parameter 'type' does not accept value '{kind}'")
    if transport == "exec":
        args = addr.get("args")
        if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
            raise URIError("Parameter 'args' is missing")
        return ExecURI(tuple(args))
    if transport == "file":
        filename, offset = addr.get("filename"), addr.get("offset", 0)
        if not isinstance(filename, str) or not filename:
            raise URIError("Parameter 'filename' is missing")
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < 1 << 64:
            raise URIError("Parameter 'offset' expects uint64")
        return FileURI(filename, offset)
    if transport == "rdma":
        raise URIError("RDMA migration is not supported by migd")
    raise URIError(f"Parameter 'transport' does not accept value '{transport}'")


def socket_address(uri: MigrationURI) -> dict[str, str] | None:
    """QEMU's SocketAddress for a socket URI (query-migrate's ``socket-address`` entries), else None."""
    if isinstance(uri, UnixURI):
        return {"type": "unix", "path": uri.path}
    if isinstance(uri, TcpURI):
        return {"type": "inet", "host": uri.host, "port": str(uri.port)}
    return None


def socket_address_text(addr: dict[str, Any] | Any, *, bracket_ipv6: bool = False) -> str:
    """A SocketAddress (``socket-address`` entries) back as text: QEMU's short form (``tcp:HOST:PORT``,
    ``unix:PATH``, ``fd:NAME``, ``vsock:CID:PORT``) as HMP prints it, or with ``bracket_ipv6`` a URI that
    parses again (``tcp:[::1]:PORT``) for tools that reuse it."""
    kind = addr.get("type")
    if kind == "inet":
        host = str(addr.get("host"))
        if bracket_ipv6 and ":" in host:
            host = f"[{host}]"
        return f"tcp:{host}:{addr.get('port')}"
    if kind == "unix":
        return f"unix:{addr.get('path')}"
    if kind == "fd":
        return f"fd:{addr.get('str')}"
    if kind == "vsock":
        return f"vsock:{addr.get('cid')}:{addr.get('port')}"
    return str(kind)
