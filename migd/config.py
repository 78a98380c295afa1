"""The configuration of one migd process: the machine it hosts and how the daemon is reached.

The same keys come from the command line and from a TOML file (``--config``); the command line wins.
Values are validated here, once, so the rest of the daemon can trust them.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from migd import qemuopts, units
from migd.machine.workloads import parse_workload
from migd.objects import parse_spec

CacheMode = Literal["writeback", "writethrough", "none", "directsync", "unsafe"]


class ConfigError(ValueError):
    """A bad configuration value; ``option`` names the option as the user wrote it."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option
        self.message = message


def parse_size(text: str | int) -> int:
    """A memory size in bytes, in the size grammar of migd.units; like QEMU's ``-m``, a bare number is MiB."""
    if isinstance(text, bool):
        raise ValueError(f"invalid size {text!r}")
    if isinstance(text, int):
        value = text << 20
    else:
        value = units.parse_size(text, default_unit=units.MiB)  # its SizeError says what is wrong
    if value < units.PAGE_SIZE:
        raise ValueError(f"size {text!r} is too small (at least {units.PAGE_SIZE} bytes)")
    return -(-value // units.PAGE_SIZE) * units.PAGE_SIZE  # QEMU rounds RAM up to a page


def parse_drive(spec: str | dict[str, Any]) -> DriveConfig:
    """``file=PATH[,cache=MODE]`` (QEMU's -drive syntax, ',,' escapes a comma) or a TOML table."""
    if isinstance(spec, dict):
        return DriveConfig.model_validate(spec)
    return DriveConfig.model_validate(qemuopts.keyvals(qemuopts.split(spec)))  # OptsError is a ValueError


def check_qmp_uri(uri: str) -> str:
    """``unix:PATH`` or ``tcp:HOST:PORT``: the QMP listeners migd can open."""
    if uri.startswith("unix:") and len(uri) > 5:
        if len(uri[5:].encode()) > 107:
            raise ValueError(f"unix socket path too long: '{uri[5:]}'")
        return uri
    if uri.startswith("tcp:"):
        split_host_port(uri[4:])
        return uri
    raise ValueError(f"'{uri}' is not unix:PATH or tcp:HOST:PORT")


def split_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) into its parts, with a checked port number."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"'{text}' is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "127.0.0.1", int(port)  # loopback unless a host is named


class DriveConfig(BaseModel):
    """One drive: a host file the guest writes through a cache."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: Path
    cache: CacheMode = "writeback"

    @field_validator("file")
    @classmethod
    def _nonempty(cls, value: Path) -> Path:
        if not str(value) or str(value) == ".":
            raise ValueError("file= must name a file")
        return value


class MachineConfig(BaseModel):
    """What the guest is: the part of the configuration that migrates with it."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    memory: int = Field(default=256 << 20, ge=units.PAGE_SIZE)
    smp: int = Field(default=1, ge=1, le=256)
    workload: str = "idle"
    drives: list[DriveConfig] = Field(default_factory=list)
    mem_path: Path | None = None
    mem_share: bool = False  # --mem-path FILE,share=on: other processes may map the file too
    start_paused: bool = False

    @field_validator("memory", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int:
        return parse_size(value) if isinstance(value, str) else value

    @field_validator("workload")
    @classmethod
    def _workload(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the workload spec is empty")
        try:
            parse_workload(value)
        except ValueError as exc:
            raise ValueError(str(exc).removeprefix("workload: ")) from None
        return value


class DaemonConfig(BaseModel):
    """How the daemon is reached and what it waits for, around the machine."""

    model_config = ConfigDict(extra="forbid")

    machine: MachineConfig = Field(default_factory=MachineConfig)
    qmp: list[str] = Field(default_factory=list)
    incoming: str | None = None
    http: str | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    objects: list[str | dict[str, Any]] = Field(default_factory=list)  # --object / TOML object

    @field_validator("qmp")
    @classmethod
    def _qmp(cls, value: list[str]) -> list[str]:
        return [check_qmp_uri(uri) for uri in value]

    @field_validator("incoming")
    @classmethod
    def _incoming(cls, value: str | None) -> str | None:
        if value is not None and value != "defer" and ":" not in value:
            raise ValueError(f"'{value}' is not a migration URI (e.g. tcp:HOST:PORT, unix:PATH) or 'defer'")
        return value

    @field_validator("http")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        if value is not None:
            split_host_port(value)
        return value

    def http_address(self) -> tuple[str, int] | None:
        return split_host_port(self.http) if self.http else None


# The long option names (also the TOML keys), by the model they configure.
_MACHINE_KEYS = {"name", "memory", "smp", "workload", "drive", "mem-path", "S", "start-paused"}
_DAEMON_KEYS = {"qmp", "incoming", "http", "log-level", "object"}


def _option_of(key: str) -> str:
    return "-S" if key in ("S", "start-paused", "start_paused") else "--" + key.replace("_", "-")


def build(values: dict[str, Any]) -> DaemonConfig:
    """Validate option values keyed by option name (``mem-path``, ``drive``...) into a DaemonConfig.

    Raises ConfigError naming the first bad option.
    """
    machine: dict[str, Any] = {}
    daemon: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = raw_key.replace("_", "-") if raw_key not in ("S",) else raw_key
        option = _option_of(key)
        if key not in _MACHINE_KEYS and key not in _DAEMON_KEYS:
            raise ConfigError(option, "unknown option")
        try:
            if key == "memory":
                machine["memory"] = parse_size(value)
            elif key == "drive":
                items = value if isinstance(value, list) else [value]
                machine["drives"] = [parse_drive(item) for item in items]
            elif key == "mem-path":
                machine.update(parse_mem_path(value))
            elif key in ("S", "start-paused"):
                machine["start_paused"] = value
            elif key in _MACHINE_KEYS:
                machine[key.replace("-", "_")] = value
            elif key == "qmp":
                daemon["qmp"] = value if isinstance(value, list) else [value]
            elif key == "object":
                items = value if isinstance(value, list) else [value]
                for item in items:
                    parse_spec(item)  # the syntax now; the files are read at start-up
                daemon["objects"] = items
            else:
                daemon[key.replace("-", "_")] = value
        except (ValueError, ValidationError) as exc:
            raise ConfigError(option, _first_message(exc)) from None
    try:
        mc = MachineConfig.model_validate(machine)
    except ValidationError as exc:
        raise _config_error(exc) from None
    try:
        return DaemonConfig.model_validate({**daemon, "machine": mc})
    except ValidationError as exc:
        raise _config_error(exc) from None


def parse_mem_path(value: Any) -> dict[str, Any]:
    """``FILE[,share=on|off]`` (QEMU's spelling for memory-backend-file): the path and whether to share."""
    if not isinstance(value, str):
        return {"mem_path": value}
    path, sep, option = value.rpartition(",share=")
    if not sep:
        return {"mem_path": value}
    if option not in ("on", "off"):
        raise ValueError(f"share= must be on or off, not '{option}'")
    return {"mem_path": path, "mem_share": option == "on"}


def load_toml(path: Path) -> dict[str, Any]:
    """Read a configuration file; its keys are the long option names (``mem-path = "..."``)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError("--config", f"cannot read '{path}': {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"'{path}': {exc}") from None
    for key in data:
        norm = key if key == "S" else key.replace("_", "-")
        if norm not in _MACHINE_KEYS and norm not in _DAEMON_KEYS:
            raise ConfigError("--config", f"'{path}': unknown key '{key}'")
    return data


def _first_message(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        msg = str(err["msg"])
        return msg.removeprefix("Value error, ")
    return str(exc)


def _config_error(exc: ValidationError) -> ConfigError:
    err = exc.errors()[0]
    field = str(err["loc"][0]) if err["loc"] else "config"
    if field == "drives":
        field = "drive"
    if field == "machine" and len(err["loc"]) > 1:
        field = str(err["loc"][1])
    return ConfigError(_option_of(field), _first_message(exc))
