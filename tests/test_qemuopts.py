"""QEMU's option syntax, shared by ``--object`` and ``--drive``: escaped commas, and each caller's texts."""

from __future__ import annotations

import pytest

from migd import qemuopts
from migd.config import parse_drive
from migd.objects import ObjectError, parse_spec


def test_split_unescapes_double_commas() -> None:
    assert qemuopts.split("file=/a,,b,cache=none") == ["file=/a,b", "cache=none"]
    assert qemuopts.split("one") == ["one"]
    assert qemuopts.keyvals(["a=1", "b=", "c=x=y"]) == {"a": "1", "b": "", "c": "x=y"}


@pytest.mark.parametrize(("parts", "twice", "text"), [
    (["a=1", "bare"], False, "'bare' is not KEY=VALUE"),
    (["a=1", "a=2"], True, "'a' given twice"),
])
def test_keyvals_refuses_bare_words_and_repeats(parts: list[str], twice: bool, text: str) -> None:
    with pytest.raises(qemuopts.OptsError) as info:
        qemuopts.keyvals(parts)
    assert info.value.twice is twice and str(info.value) == text


def test_drive_spec_keeps_its_texts() -> None:
    drive = parse_drive("file=/tmp/a,,b.img")
    assert str(drive.file) == "/tmp/a,b.img"
    with pytest.raises(ValueError, match=r"^'cache' given twice$"):
        parse_drive("file=/x,cache=none,cache=writeback")
    with pytest.raises(ValueError, match=r"^'readonly' is not KEY=VALUE$"):
        parse_drive("file=/x,readonly")


def test_object_spec_keeps_qemus_texts() -> None:
    assert parse_spec("authz-simple,id=a0,identity=CN=x,,y") == ("authz-simple", "a0", {"identity": "CN=x,y"})
    with pytest.raises(ObjectError, match=r"^Invalid parameter 'verify-peer'$"):
        parse_spec("tls-creds-x509,id=t0,verify-peer")
    with pytest.raises(ObjectError, match=r"^Parameter 'dir' given twice$"):
        parse_spec("tls-creds-x509,id=t0,dir=/a,dir=/b")
    with pytest.raises(ObjectError, match=r"^Parameter 'id' is missing$"):
        parse_spec("tls-creds-x509,dir=/a")
