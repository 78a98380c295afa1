"""User-creatable objects (QEMU's ``-object`` / ``object-add`` / ``object-del``): TLS credentials and authz.

QEMU names its TLS material by object id: ``tls-creds`` of ``migrate-set-parameters`` is the id of a
``tls-creds-x509`` object, ``tls-authz`` the id of an ``authz-simple``. migd keeps the same shape so a
management tool drives it unchanged: the objects come from ``--object TYPE,id=ID,PROP=VALUE...`` (or
the TOML ``object`` key) at start-up and from ``object-add``/``object-del`` at run time, and live in one
:class:`ObjectRegistry` per process. ``tls-creds-psk`` is refused: Python 3.11's ``ssl`` has no
TLS-PSK. Creating an object checks it at once (files readable, certificates parse), as QEMU does.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from migd import qemuopts
from migd.tlscreds import TlsCredsError, TlsCredsX509

ENDPOINTS = ("client", "server")
_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")  # QEMU's id_wellformed
_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")
PSK_UNSUPPORTED = ("tls-creds-psk is not supported by migd: the Python ssl module has no TLS-PSK; "
                   "use tls-creds-x509")


class ObjectError(ValueError):
    """A refused object-add / object-del / --object / a bad object reference; ``str()`` is QEMU's text."""


@dataclass(frozen=True)
class AuthzSimple:
    """``authz-simple``: exactly one identity allowed (for TLS: the client certificate's distinguished name)."""

    id: str
    identity: str

    def is_allowed(self, identity: str) -> bool:
        return identity == self.identity


UserObject = TlsCredsX509 | AuthzSimple


def _bool(name: str, value: Any, keyval: bool) -> bool:
    """A property value: a JSON boolean from QMP; also "on"/"off" from the command line (``keyval``)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and keyval:
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        raise ObjectError(f"Parameter '{name}' expects 'on' or 'off'")
    raise ObjectError(f"Invalid parameter type for '{name}', expected: boolean")


def _str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ObjectError(f"Invalid parameter type for '{name}', expected: string")
    return value


def create(qom_type: str, obj_id: str, props: Mapping[str, Any], keyval: bool = False) -> UserObject:
    """Build (and check) one object from its type, id and properties (``keyval``: from the command
    line, where every value is a string). Raises ObjectError."""
    if not _ID_RE.match(obj_id):
        raise ObjectError("Parameter 'id' expects an identifier")
    if qom_type == "tls-creds-psk":
        raise ObjectError(PSK_UNSUPPORTED)
    if qom_type == "tls-creds-x509":
        return _x509(obj_id, props, keyval)
    if qom_type == "authz-simple":
        unknown = sorted(set(props) - {"identity"})
        if unknown:
            raise ObjectError(f"Property '{qom_type}.{unknown[0]}' not found")
        if "identity" not in props:
            raise ObjectError("Parameter 'identity' is missing")
        return AuthzSimple(obj_id, _str("identity", props["identity"]))
    raise ObjectError(f"invalid object type: {qom_type}")


def _x509(obj_id: str, props: Mapping[str, Any], keyval: bool) -> TlsCredsX509:
    known = {"dir", "endpoint", "verify-peer", "sanity-check", "loaded"}
    unknown = sorted(set(props) - known)
    if unknown:
        raise ObjectError(f"Property 'tls-creds-x509.{unknown[0]}' not found")
    endpoint = _str("endpoint", props.get("endpoint", "client"))
    if endpoint not in ENDPOINTS:
        raise ObjectError(f"Parameter 'endpoint' does not accept value '{endpoint}'")
    verify_peer = _bool("verify-peer", props.get("verify-peer", True), keyval)
    for name in ("sanity-check", "loaded"):  # Python's ssl checks the certificates it loads anyway
        if name in props:
            _bool(name, props[name], keyval)
    if "dir" not in props:
        raise ObjectError("Missing 'dir' property value")
    try:
        return TlsCredsX509.load(obj_id, _str("dir", props["dir"]), endpoint, verify_peer)
    except TlsCredsError as exc:
        raise ObjectError(str(exc)) from None


def parse_spec(spec: str | Mapping[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """``TYPE,id=ID,KEY=VALUE...`` (',,' escapes a comma) or a TOML table with ``qom-type`` and ``id``."""
    if isinstance(spec, Mapping):
        props = dict(spec)
        qom_type, obj_id = props.pop("qom-type", None), props.pop("id", None)
    else:
        parts = qemuopts.split(spec)
        qom_type = parts[0]
        try:
            props = dict(qemuopts.keyvals(parts[1:]))
        except qemuopts.OptsError as exc:
            raise ObjectError(f"Parameter '{exc.key}' given twice" if exc.twice
                              else f"Invalid parameter '{exc.part}'") from None
        obj_id = props.pop("id", None)
    if not isinstance(qom_type, str) or not qom_type:
        raise ObjectError("Parameter 'qom-type' is missing")
    if not isinstance(obj_id, str):
        raise ObjectError("Parameter 'id' is missing")
    return qom_type, obj_id, props


class ObjectRegistry:
    """The process's objects by id (QEMU's /objects container). (any thread; a lock guards the map)"""

    def __init__(self) -> None:
        self._objects: dict[str, UserObject] = {}
        self._lock = threading.Lock()

    def add(self, qom_type: str, obj_id: str, props: Mapping[str, Any], keyval: bool = False) -> UserObject:
        """``object-add``: create and register; a duplicate id changes nothing."""
        with self._lock:
            if obj_id in self._objects:
                raise ObjectError(f"attempt to add duplicate property '{obj_id}' to object (type 'container')")
        obj = create(qom_type, obj_id, props, keyval)  # reads files: outside the lock
        with self._lock:
            if obj_id in self._objects:
                raise ObjectError(f"attempt to add duplicate property '{obj_id}' to object (type 'container')")
            self._objects[obj_id] = obj
        return obj

    def add_spec(self, spec: str | Mapping[str, Any]) -> UserObject:
        """``--object SPEC`` / a TOML ``object`` entry."""
        return self.add(*parse_spec(spec), keyval=True)

    def delete(self, obj_id: str) -> None:
        """``object-del``. A migration that already holds the credentials keeps them."""
        with self._lock:
            if self._objects.pop(obj_id, None) is None:
                raise ObjectError(f"object '{obj_id}' not found")

    def get(self, obj_id: str) -> UserObject | None:
        with self._lock:
            return self._objects.get(obj_id)

    def tls_creds(self, obj_id: str, endpoint: str) -> TlsCredsX509:
        """The credentials ``tls-creds`` names, for ``endpoint``; QEMU's texts when they do not fit."""
        obj = self.get(obj_id)
        if obj is None:
            raise ObjectError(f"No TLS credentials with id '{obj_id}'")
        if not isinstance(obj, TlsCredsX509):
            raise ObjectError(f"Object with id '{obj_id}' is not TLS credentials")
        if obj.endpoint != endpoint:
            raise ObjectError(f"Expected TLS credentials for a {endpoint} endpoint")
        return obj

    def authz(self, obj_id: str) -> AuthzSimple:
        """The authorization object ``tls-authz`` names."""
        obj = self.get(obj_id)
        if obj is None:
            raise ObjectError(f"No authorization object with ID {obj_id}")
        if not isinstance(obj, AuthzSimple):
            raise ObjectError(f"Object '{obj_id}' is not a QAuthZ subclass")
        return obj
