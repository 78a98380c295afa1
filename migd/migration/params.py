"""Migration parameters and capabilities, with QEMU 10.0's names, defaults, ranges and error texts.

Parameters are validated as a whole (copy, check, commit — QEMU's ``migrate_params_test_apply`` then
``migrate_params_check``), so a rejected ``migrate-set-parameters`` changes nothing. The committed values
live in one dict that is replaced, never mutated, so the migration thread can read a consistent view
without a lock. Only the capabilities migd really implements can be switched on; the others are listed,
because management tools query them, and refused with a clear error.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from migd.objects import ObjectRegistry
from migd.units import PAGE_SIZE as TARGET_PAGE_SIZE

SIZE_MAX = (1 << 64) - 1
MAX_MIGRATE_DOWNTIME_MS = 2_000_000
MAX_PEER_TIMEOUT = 86400  # [migd] x-migd-peer-timeout, seconds


class ParamError(Exception):
    """A refusal; ``str()`` is QEMU's text (a GenericError in QMP)."""


# --- capabilities ---------------------------------------------------------------------------------

# QEMU 10.0's MigrationCapability enum, in enum order (= query-migrate-capabilities order).
CAPABILITIES: tuple[str, ...] = (
    "xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "events", "postcopy-ram", "x-colo",
    "release-ram", "return-path", "pause-before-switchover", "multifd", "dirty-bitmaps",
    "postcopy-blocktime", "late-block-activate", "x-ignore-shared", "validate-uuid",
    "background-snapshot", "zero-copy-send", "postcopy-preempt", "switchover-ack", "dirty-limit",
    "mapped-ram",
)
SUPPORTED_CAPABILITIES = frozenset({"events", "return-path", "pause-before-switchover", "auto-converge",
                                    "multifd", "zero-copy-send"})
ZERO_COPY_ONLY = "Zero copy only available for non-compressed non-TLS multifd migration"  # QEMU's text
MULTIFD_COMPRESSION_SUPPORTED = ("none", "zlib", "zstd")  # qatzip, qpl, uadk: hardware migd lacks
# migd differs from QEMU here on purpose: with a socket transport the source only reports `completed`
# once the destination acknowledged a successful load (exec/file channels have no return path).
DEFAULT_CAPABILITIES: dict[str, bool] = {name: name == "return-path" for name in CAPABILITIES}


# --- parameters -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ParamSpec:
    name: str
    kind: str  # size | uint64 | uint32 | uint8 | bool | str | enum | list
    default: Any
    choices: tuple[str, ...] = ()


MULTIFD_COMPRESSION = ("none", "zlib", "zstd", "qatzip", "qpl", "uadk")
MIGRATION_MODES = ("normal", "cpr-reboot", "cpr-transfer")
ZERO_PAGE_DETECTION = ("none", "legacy", "multifd")

# MigrationParameters members in schema order (= the order QEMU prints them).
PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("announce-initial", "size", 50),
    ParamSpec("announce-max", "size", 550),
    ParamSpec("announce-rounds", "size", 5),
    ParamSpec("announce-step", "size", 100),
    ParamSpec("throttle-trigger-threshold", "uint8", 50),
    ParamSpec("cpu-throttle-initial", "uint8", 20),
    ParamSpec("cpu-throttle-increment", "uint8", 10),
    ParamSpec("cpu-throttle-tailslow", "bool", False),
    ParamSpec("tls-creds", "str", ""),
    ParamSpec("tls-hostname", "str", ""),
    ParamSpec("tls-authz", "str", ""),
    ParamSpec("max-bandwidth", "size", 134217728),
    ParamSpec("avail-switchover-bandwidth", "size", 0),
    ParamSpec("downtime-limit", "uint64", 300),
    ParamSpec("x-checkpoint-delay", "uint32", 20000),
    ParamSpec("multifd-channels", "uint8", 2),
    ParamSpec("xbzrle-cache-size", "size", 64 << 20),
    ParamSpec("max-postcopy-bandwidth", "size", 0),
    ParamSpec("max-cpu-throttle", "uint8", 99),
    ParamSpec("multifd-compression", "enum", "none", MULTIFD_COMPRESSION),
    ParamSpec("multifd-zlib-level", "uint8", 1),
    ParamSpec("multifd-qatzip-level", "uint8", 1),
    ParamSpec("multifd-zstd-level", "uint8", 1),
    ParamSpec("block-bitmap-mapping", "list", None),
    ParamSpec("x-vcpu-dirty-limit-period", "uint64", 1000),
    ParamSpec("vcpu-dirty-limit", "uint64", 1),
    ParamSpec("mode", "enum", "normal", MIGRATION_MODES),
    ParamSpec("zero-page-detection", "enum", "multifd", ZERO_PAGE_DETECTION),
    ParamSpec("direct-io", "bool", False),
    # migd's built-in convergence policy (issue 10; migration/policy.py), all off by default
    ParamSpec("x-migd-progress-timeout", "uint64", 0),  # s without a new low of remaining; 0 = off
    ParamSpec("x-migd-progress-action", "enum", "abort", ("abort", "escalate")),
    ParamSpec("x-migd-downtime-steps", "uint8", 0),  # Nova-like downtime schedule; 0 = off
    ParamSpec("x-migd-downtime-step-delay", "uint64", 75),  # s per GiB of guest RAM between steps
    ParamSpec("x-migd-downtime-max", "uint64", 0),  # ms the policy may raise the limit to; 0 = derived
    ParamSpec("x-migd-auto-throttle", "bool", False),  # the throttle the dirty rate needs
    ParamSpec("x-migd-completion-timeout", "uint64", 0),  # s per GiB of guest RAM; 0 = off
    # [migd] seconds of silence after which a migd peer is given up on (heartbeats, docs/SWITCHOVER.md §2)
    ParamSpec("x-migd-peer-timeout", "uint32", 10),
    # [migd] checksum records after every section (docs/FORMAT.md §1.2); false: none, as QEMU writes
    ParamSpec("x-migd-checksums", "bool", True),
)
SPECS: dict[str, ParamSpec] = {spec.name: spec for spec in PARAMS}
DEFAULT_PARAMETERS: dict[str, Any] = {spec.name: spec.default for spec in PARAMS}

_UINT_BITS = {"uint8": 8, "uint32": 32}


def _coerce(spec: ParamSpec, value: Any) -> Any:
    """Type-check one input value as QEMU's QMP input visitor does (same error texts)."""
    name = spec.name
    if spec.kind in ("size", "uint64", "uint32", "uint8"):
        if isinstance(value, bool) or not isinstance(value, int):
            expected = "size" if spec.kind == "size" else "integer"
            raise ParamError(f"Invalid parameter type for '{name}', expected: {expected}")
        if spec.kind == "size":
            if not 0 <= value <= SIZE_MAX:
                raise ParamError(f"Invalid parameter type for '{name}', expected: size")
            return value
        if not -(1 << 63) <= value <= SIZE_MAX:
            raise ParamError(f"Invalid parameter type for '{name}', expected: integer")
        value &= SIZE_MAX  # QEMU accepts negative numbers for uint64 and reads them two's-complement
        bits = _UINT_BITS.get(spec.kind)
        if bits is not None and value >= 1 << bits:
            raise ParamError(f"Parameter '{name}' expects {spec.kind}")
        return value
    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise ParamError(f"Invalid parameter type for '{name}', expected: boolean")
        return value
    if spec.kind == "str":  # StrOrNull in the set command: null means ""
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ParamError(f"Invalid parameter type for '{name}', expected: string")
        return value
    if spec.kind == "enum":
        if not isinstance(value, str):
            raise ParamError(f"Invalid parameter type for '{name}', expected: string")
        if value not in spec.choices:
            raise ParamError(f"Parameter '{name}' does not accept value '{value}'")
        return value
    # block-bitmap-mapping: a list of BitmapMigrationNodeAlias objects, kept as given
    if not isinstance(value, list):
        raise ParamError(f"Invalid parameter type for '{name}', expected: array")
    for item in value:
        if not isinstance(item, Mapping):
            raise ParamError(f"Invalid parameter type for '{name}', expected: object")
    return [dict(item) for item in value]


def _invalid(param: str, expects: str) -> ParamError:
    return ParamError(f"Parameter '{param}' expects {expects}")


def check_parameters(p: Mapping[str, Any]) -> None:
    """QEMU's migrate_params_check on a complete (merged) set, in QEMU's order."""
    if not 1 <= p["throttle-trigger-threshold"] <= 100:
        raise _invalid("throttle_trigger_threshold", "an integer in the range of 1 to 100")
    if not 1 <= p["cpu-throttle-initial"] <= 99:
        raise _invalid("cpu_throttle_initial", "an integer in the range of 1 to 99")
    if not 1 <= p["cpu-throttle-increment"] <= 99:
        raise _invalid("cpu_throttle_increment", "an integer in the range of 1 to 99")
    if p["max-bandwidth"] > SIZE_MAX:
        raise _invalid("max_bandwidth", f"an integer in the range of 0 to {SIZE_MAX} bytes/second")
    if p["avail-switchover-bandwidth"] > SIZE_MAX:
        raise _invalid("avail_switchover_bandwidth",
                       f"an integer in the range of 0 to {SIZE_MAX} bytes/second")
    if p["downtime-limit"] > MAX_MIGRATE_DOWNTIME_MS:
        raise _invalid("downtime_limit", f"an integer in the range of 0 to {MAX_MIGRATE_DOWNTIME_MS} ms")
    if p["multifd-channels"] < 1:
        raise _invalid("multifd_channels", "a value between 1 and 255")
    if p["multifd-zlib-level"] > 9:
        raise _invalid("multifd_zlib_level", "a value between 0 and 9")
    if not 1 <= p["multifd-qatzip-level"] <= 9:
        raise _invalid("multifd_qatzip_level", "a value between 1 and 9")
    if p["multifd-zstd-level"] > 20:
        raise _invalid("multifd_zstd_level", "a value between 0 and 20")
    cache = p["xbzrle-cache-size"]
    if cache < TARGET_PAGE_SIZE or cache & (cache - 1):
        raise _invalid("xbzrle_cache_size", "a power of two no less than the target page size")
    if not p["cpu-throttle-initial"] <= p["max-cpu-throttle"] <= 99:
        raise _invalid("max_cpu_throttle", "an integer in the range of cpu_throttle_initial to 99")
    if p["announce-initial"] > 100000:
        raise _invalid("announce_initial", "a value between 0 and 100000")
    if p["announce-max"] > 100000:
        raise _invalid("announce_max", "a value between 0 and 100000")
    if p["announce-rounds"] > 1000:
        raise _invalid("announce_rounds", "a value between 0 and 1000")
    if not 1 <= p["announce-step"] <= 10000:
        raise _invalid("announce_step", "a value between 0 and 10000")
    if p["direct-io"]:
        raise ParamError("No build-time support for direct-io")
    if not 1 <= p["x-vcpu-dirty-limit-period"] <= 1000:
        raise _invalid("x-vcpu-dirty-limit-period", "a value between 1 and 1000")
    if p["vcpu-dirty-limit"] < 1:
        raise _invalid("vcpu_dirty_limit", "is invalid, it must greater then 1 MB/s")
    if p["x-migd-downtime-max"] > MAX_MIGRATE_DOWNTIME_MS:
        raise _invalid("x-migd-downtime-max", f"an integer in the range of 0 to {MAX_MIGRATE_DOWNTIME_MS} ms")
    if not 1 <= p["x-migd-peer-timeout"] <= MAX_PEER_TIMEOUT:
        raise _invalid("x-migd-peer-timeout", f"a value between 1 and {MAX_PEER_TIMEOUT} seconds")
    if p["multifd-compression"] not in MULTIFD_COMPRESSION_SUPPORTED:
        raise ParamError(f"multifd-compression '{p['multifd-compression']}' is not supported by migd "
                         "(use none, zlib or zstd)")
    if p["mode"] != "normal":
        raise ParamError(f"Migration mode '{p['mode']}' is not supported by migd")


class MigrationConfig:
    """The user's parameters and capabilities; they survive from one migration to the next."""

    def __init__(self) -> None:
        self._params: dict[str, Any] = dict(DEFAULT_PARAMETERS)
        self._caps: dict[str, bool] = dict(DEFAULT_CAPABILITIES)
        self.objects = ObjectRegistry()  # -object / object-add: what tls-creds and tls-authz name

    # parameters
    def param(self, name: str) -> Any:
        return self._params[name]

    @property
    def params(self) -> Mapping[str, Any]:
        """A consistent snapshot: the dict is replaced on commit, never changed in place."""
        return self._params

    def query_parameters(self) -> dict[str, Any]:
        """QEMU 10.0's query-migrate-parameters: every member, block-bitmap-mapping only when set."""
        out = dict(self._params)
        if out["block-bitmap-mapping"] is None:
            del out["block-bitmap-mapping"]
        return out

    def set_parameters(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Validate ``changes`` (hyphenated names) against a copy and commit; returns what changed."""
        merged = dict(self._params)
        for name, value in changes.items():
            spec = SPECS.get(name)
            if spec is None:
                raise ParamError(f"Parameter '{name}' is unexpected")
            merged[name] = _coerce(spec, value)
        check_parameters(merged)
        _check_zero_copy(self._caps, merged)
        changed = {k: v for k, v in merged.items() if self._params[k] != v}
        self._params = merged
        return changed

    # capabilities
    def cap(self, name: str) -> bool:
        return self._caps[name]

    def query_capabilities(self) -> list[dict[str, Any]]:
        return [{"capability": name, "state": self._caps[name]} for name in CAPABILITIES]

    def set_capabilities(self, changes: Iterable[tuple[str, bool]]) -> None:
        """Apply ``(name, state)`` pairs as a whole (the caller refuses while a migration runs)."""
        merged = dict(self._caps)
        for name, state in changes:
            if name not in merged:
                raise ParamError(f"Parameter 'capability' does not accept value '{name}'")
            if state and name not in SUPPORTED_CAPABILITIES:
                raise ParamError(f"Capability '{name}' is not supported by migd")
            merged[name] = bool(state)
        _check_zero_copy(merged, self._params)
        self._caps = merged


def _check_zero_copy(caps: Mapping[str, bool], p: Mapping[str, Any]) -> None:
    """QEMU's rule for ``zero-copy-send`` (Linux): only with multifd, without compression (xbzrle or
    multifd-compression) and without TLS; checked on capabilities and on parameters alike."""
    if caps["zero-copy-send"] and (not caps["multifd"] or caps["xbzrle"]
                                   or p["multifd-compression"] != "none" or p["tls-creds"]):
        raise ParamError(ZERO_COPY_ONLY)
