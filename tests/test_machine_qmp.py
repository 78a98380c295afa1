"""The machine's QMP commands against a real migd process (x-migd-* extensions, stop freezing RAM)."""

from __future__ import annotations

import time

import pytest
from helpers import wait_for as poll

MiB = 1 << 20


def ok(vm, command: str, **args):
    """The return of a command whose arguments include ``name`` (which Migd.cmd itself takes)."""
    reply = vm.cmd_raw(command, args)
    assert "return" in reply, reply
    return reply["return"]


def error(vm, command: str, **args) -> dict[str, str]:
    reply = vm.cmd_raw(command, args)
    assert "error" in reply, reply
    return reply["error"]


def digests(vm) -> dict[str, str]:
    return {b["name"]: b["digest"] for b in vm.cmd("x-migd-ram-digest")["blocks"]}


def test_stop_freezes_ram_and_running_guest_changes_it(migd_factory):
    vm = migd_factory("m", "-m", "64M", "--workload", "random,rate=32M")
    poll(lambda: vm.cmd("x-migd-query-workload")["vcpus"][0]["bytes-written"] > 4 * MiB)
    before = digests(vm)
    poll(lambda: digests(vm) != before)  # the check below can fail: a running guest changes RAM
    vm.cmd("stop")
    a = digests(vm)
    time.sleep(0.2)
    b = digests(vm)
    assert a == b and set(a) == {"ram0"} and len(a["ram0"]) == 32
    blocks = vm.cmd("x-migd-ram-digest")["blocks"]
    assert blocks[0]["size"] == 64 * MiB
    vm.cmd("cont")
    poll(lambda: digests(vm) != b)


def test_hotplug_and_machine_query(migd_factory):
    vm = migd_factory("m", "-m", "32M", "--smp", "2")
    info = vm.cmd("x-migd-query-machine")
    assert info["smp"] == 2 and info["ram"]["total"] == 32 * MiB
    assert [b["name"] for b in info["ram"]["blocks"]] == ["ram0"]
    version = info["ram"]["version"]
    assert ok(vm, "x-migd-ram-add", name="hot0", size=8 * MiB) == {}
    info = vm.cmd("x-migd-query-machine")
    assert info["ram"]["version"] == version + 1 and info["ram"]["total"] == 40 * MiB
    assert set(digests(vm)) == {"ram0", "hot0"}
    err = error(vm, "x-migd-ram-add", name="hot0", size=8 * MiB)
    assert err["class"] == "GenericError" and "already exists" in err["desc"]
    err = error(vm, "x-migd-ram-add", name="odd", size=1000)
    assert "multiple of 4096" in err["desc"]
    err = error(vm, "x-migd-ram-remove", name="ram0")
    assert "cannot be removed" in err["desc"]
    err = error(vm, "x-migd-ram-remove", name="nope")
    assert err["class"] == "DeviceNotFound"
    err = error(vm, "x-migd-ram-add", name="x")
    assert err["desc"] == "Parameter 'size' is missing"
    err = error(vm, "x-migd-ram-add", name="x", size="big")
    assert "Invalid parameter type for 'size'" in err["desc"]
    assert ok(vm, "x-migd-ram-remove", name="hot0") == {}
    info = vm.cmd("x-migd-query-machine")
    assert info["ram"]["version"] == version + 2 and info["ram"]["total"] == 32 * MiB
    assert vm.cmd("query-status")["status"] == "running"  # nothing broke


def test_workload_set_and_query(migd_factory):
    vm = migd_factory("m", "-m", "32M")
    assert vm.cmd("x-migd-query-workload")["kind"] == "idle"
    err = error(vm, "x-migd-workload-set", spec="random,rate=lots")
    assert err["class"] == "GenericError" and "invalid rate 'lots'" in err["desc"]
    err = error(vm, "x-migd-workload-set", spec="random,wss=1G")
    assert "larger than ram0" in err["desc"]
    assert vm.cmd("x-migd-query-workload")["kind"] == "idle"  # bad input changed nothing
    vm.cmd("x-migd-workload-set", spec="random,rate=20M,wss=16M,seed=9")
    info = poll(lambda: (i := vm.cmd("x-migd-query-workload"))["achieved-rate"] > 0 and i)
    assert info["spec"] == "random,rate=20M,wss=16M,seed=9" and info["rate"] == 20 * MiB
    assert info["wss"] == 16 * MiB and info["seed"] == 9
    m = vm.cmd("x-migd-query-machine")
    assert m["workload"]["spec"] == info["spec"] and m["status"] == "running"
    vm.cmd("x-migd-workload-set", spec="counter")
    poll(lambda: vm.cmd("x-migd-query-workload")["vcpus"][0].get("counter", 0) > 10)
    vm.cmd("stop")
    w = vm.cmd("x-migd-query-workload")["vcpus"][0]
    assert w["consistent"] is True and w["ram-counter"] == w["counter"]


@pytest.mark.parametrize("args,status,message", [
    (["--workload", "busy"], 2, "--workload: unknown kind 'busy'"),  # refused by the option parser
    # refused when the RAM is mapped: bad configuration, status 2 (issue 14; it exited 1)
    (["--mem-path", "{tmp}/small"], 2, "--mem-path .*but the machine has"),
])
def test_bad_machine_options_fail_clearly(migd_factory, tmp_path, args, status, message):
    (tmp_path / "small").write_bytes(b"x" * 4096)
    args = [a.format(tmp=tmp_path) for a in args]
    from helpers import MigdError

    with pytest.raises(MigdError, match=f"(?s)exited with {status} .*{message}"):
        migd_factory("bad", "-m", "16M", *args)
