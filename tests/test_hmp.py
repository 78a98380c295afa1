"""HMP over QMP (``human-monitor-command``, ``qmp-shell -H``) and the introspection commands."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import wait_for

from migd.qmp import hmp_text
from migd.qmp.commands.hmp import HMPError, parameter_value

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def hmp(vm, line: str) -> str:
    return vm.cmd("human-monitor-command", command_line=line)


# -- layouts (pure) ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "text"), [
    (0, "0 B"), (999, "999 B"), (1000, "0.977 KiB"), (4096, "4 KiB"), (64 * MiB, "64 MiB"),
    (int(16.5 * MiB), "16.5 MiB"), (1 << 30, "1 GiB"), (3 * (1 << 40), "3 TiB"),
])
def test_size_to_str_like_qemus_monitor(value: int, text: str) -> None:
    assert hmp_text.size_to_str(value) == text


def test_info_migrate_layout_of_an_active_migration() -> None:
    info = {
        "status": "active", "total-time": 1234, "setup-time": 5, "expected-downtime": 300,
        "cpu-throttle-percentage": 20,
        "ram": {"mbps": 1000.5, "page-size": 4096, "total": 1 << 30, "transferred": 512 * MiB,
                "remaining": 64 * MiB, "precopy-bytes": 512 * MiB, "multifd-bytes": 0, "postcopy-bytes": 0,
                "normal": 131072, "duplicate": 7, "pages-per-second": 30000, "dirty-pages-rate": 1500,
                "dirty-sync-count": 3, "postcopy-requests": 0, "downtime-bytes": 0,
                "dirty-sync-missed-zero-copy": 0},
    }
    assert hmp_text.info_migrate(info) == (
        "Status: \t\tactive\n"
        "Time (ms): \t\ttotal=1234, setup=5, exp_down=300\n"
        "RAM info:\n"
        "  Throughput (Mbps): \t1000.50\n"
        "  Sizes: \t\tpagesize=4 KiB, total=1 GiB\n"
        "  Transfers: \t\ttransferred=512 MiB, remain=64 MiB\n"
        "    Channels: \t\tprecopy=512 MiB, multifd=0 B, postcopy=0 B\n"
        "    Page Types: \tnormal=131072, zero=7\n"
        "  Page Rates (pps): \ttransfer=30000, dirty=1500\n"
        "  Others: \t\tdirty_syncs=3\n"
        "CPU Throttle (%): 20\n"
    )
    assert hmp_text.info_migrate({}) == ""
    failed = hmp_text.info_migrate({"status": "failed", "error-desc": "Unable to write"})
    assert failed == "Status: \t\tfailed (Unable to write)\n"
    listening = {"status": "setup", "socket-address": [{"type": "inet", "host": "0.0.0.0", "port": "4444"}]}
    assert hmp_text.info_migrate(listening, show_all=True) == "Status: \t\tsetup\nSockets: [\n\ttcp:0.0.0.0:4444\n]\n"


def test_info_status_layout() -> None:
    assert hmp_text.info_status({"running": True, "status": "running"}) == "VM status: running\n"
    assert hmp_text.info_status({"running": False, "status": "paused"}) == "VM status: paused\n"
    assert hmp_text.info_status({"running": False, "status": "postmigrate"}) == "VM status: paused (postmigrate)\n"


@pytest.mark.parametrize(("text", "value"), [
    ("0", 0), ("4096", 4096), ("64M", 64 * MiB), ("64m", 64 * MiB), ("1.5G", 3 << 29), ("2k", 2048),
    ("10B", 10), ("1P", 1 << 50), ("1.5", None), ("-1", None), ("12x", None), ("", None), ("16E", None),
])
def test_monitor_sizes(text: str, value: int | None) -> None:
    """HMP's size arguments read the one size grammar (migd/units.py), P and E suffixes included."""
    if value is None:
        with pytest.raises(HMPError, match="Parameter 'max-bandwidth' expects a size"):
            parameter_value("max-bandwidth", text)
    else:
        assert parameter_value("max-bandwidth", text) == value


# -- against a daemon --------------------------------------------------------------------------------

@pytest.fixture
def vm(migd_factory):
    return migd_factory("hmp", "-m", "32M")


def test_info_status_stop_cont(vm) -> None:
    assert hmp(vm, "info status") == "VM status: running\r\n"
    assert hmp(vm, "stop") == ""
    assert vm.cmd("query-status")["status"] == "paused"
    assert hmp(vm, "info status") == "VM status: paused\r\n"
    assert hmp(vm, "c") == ""
    assert vm.cmd("query-status")["running"] is True
    assert hmp(vm, "info migrate") == ""
    assert hmp(vm, "frobnicate") == "unknown command: 'frobnicate'\r\n"
    assert hmp(vm, "info frobnicate") == "unknown command: 'info frobnicate'\r\n"
    err = vm.cmd_raw("human-monitor-command", {"command-line": "info status", "cpu-index": 5})
    assert err["error"]["desc"] == "Parameter 'cpu-index' expects a CPU number"
    err = vm.cmd_raw("human-monitor-command", {})
    assert err["error"]["desc"] == "Parameter 'command-line' is missing"


def test_parameters_and_capabilities_go_through_the_qmp_handlers(vm) -> None:
    assert hmp(vm, "migrate_set_parameter max-bandwidth 64M") == ""
    assert hmp(vm, "migrate_set_parameter downtime-limit 500") == ""
    assert hmp(vm, "migrate_set_parameter cpu-throttle-tailslow on") == ""
    params = vm.cmd("query-migrate-parameters")
    assert params["max-bandwidth"] == 64 * MiB and params["downtime-limit"] == 500
    assert params["cpu-throttle-tailslow"] is True
    text = hmp(vm, "info migrate_parameters")
    assert "max-bandwidth: 67108864 bytes/second\r\n" in text
    assert "downtime-limit: 500 ms\r\n" in text and "tls-creds: ''\r\n" in text
    assert "cpu-throttle-tailslow: on\r\n" in text
    # refusals in QEMU's words, nothing changed
    assert hmp(vm, "migrate_set_parameter nope 1") == "Error: invalid parameter value: nope\r\n"
    assert hmp(vm, "migrate_set_parameter max-bandwidth lots") == "Error: Parameter 'max-bandwidth' expects a size\r\n"
    assert hmp(vm, "migrate_set_parameter multifd-compression lz4") == (
        "Error: Parameter 'multifd-compression' does not accept value 'lz4'\r\n")
    assert hmp(vm, "migrate_set_parameter cpu-throttle-initial 300") == (
        "Error: Parameter 'cpu-throttle-initial' expects uint8\r\n")
    assert vm.cmd("query-migrate-parameters") == params
    assert hmp(vm, "migrate_set_capability pause-before-switchover on") == ""
    caps = {c["capability"]: c["state"] for c in vm.cmd("query-migrate-capabilities")}
    assert caps["pause-before-switchover"] is True
    text = hmp(vm, "info migrate_capabilities")
    assert "pause-before-switchover: on\r\n" in text and "xbzrle: off\r\n" in text
    assert hmp(vm, "migrate_set_capability xbzrle on") == "Error: Capability 'xbzrle' is not supported by migd\r\n"
    assert hmp(vm, "migrate_set_capability events maybe") == "Error: Expected 'on' or 'off'\r\n"


def test_migrate_info_migrate_and_cancel(migd_factory, tmp_path) -> None:
    src = migd_factory("src", "-m", "64M", "--workload", "random,rate=32M")
    dst = migd_factory("dst", "-m", "64M", "--incoming", "defer")
    sock = dst.sock_path("mig")
    dst.cmd("migrate-incoming", uri=f"unix:{sock}")
    assert hmp(dst, "info migrate -a").startswith("Status: \t\tsetup\r\nSockets: [\r\n\tunix:")
    # held until cancelled: pause-before-switchover is the barrier (a 1 ms limit alone is no hold, see
    # helpers.hold_active), and the 1 ms limit keeps it active before that
    assert hmp(src, "migrate_set_capability pause-before-switchover on") == ""
    assert hmp(src, "migrate_set_parameter downtime-limit 1") == ""
    assert hmp(src, "migrate carrier-pigeon:x").startswith("Error: ")
    assert hmp(src, "migrate") == "Error: migrate: missing argument\r\n"
    assert hmp(src, f"migrate -d unix:{sock}") == ""
    def active() -> str | None:
        text = hmp(src, "info migrate")
        return text if text.startswith(("Status: \t\tactive", "Status: \t\tpre-switchover")) \
            and "RAM info" in text else None

    text = wait_for(active, what="an active migration")
    lines = text.split("\r\n")
    assert lines[1].startswith("Time (ms): \t\ttotal=") and lines[2] == "RAM info:"
    assert lines[4] == "  Sizes: \t\tpagesize=4 KiB, total=64 MiB"
    assert hmp(src, "migrate_cancel") == ""
    wait_for(lambda: "Status: \t\tcancelled" in hmp(src, "info migrate"), what="cancelled")
    wait_for(lambda: hmp(src, "info status") == "VM status: running\r\n", what="the guest running again")


def test_query_events_and_schema(vm) -> None:
    assert {e["name"] for e in vm.cmd("query-events")} == {"MIGRATION", "MIGRATION_PASS", "RESUME", "SHUTDOWN", "STOP"}
    schema = vm.cmd("query-qmp-schema")
    by_name = {e["name"]: e for e in schema}
    assert len(by_name) == len(schema)  # every name once
    commands = {e["name"] for e in schema if e["meta-type"] == "command"}
    assert {c["name"] for c in vm.cmd("query-commands")} == commands
    migrate_args = by_name[by_name["migrate"]["arg-type"]]
    members = {m["name"]: m for m in migrate_args["members"]}
    assert by_name[members["uri"]["type"]]["json-type"] == "string" and "default" in members["uri"]
    caps_args = by_name[by_name["migrate-set-capabilities"]["arg-type"]]
    (caps,) = caps_args["members"]
    assert "default" not in caps
    element = by_name[by_name[caps["type"]]["element-type"]]
    cap_type = by_name[{m["name"]: m for m in element["members"]}["capability"]["type"]]
    assert cap_type["meta-type"] == "enum" and "auto-converge" in cap_type["values"]
    migration_event = by_name[by_name["MIGRATION"]["arg-type"]]
    assert by_name[migration_event["members"][0]["type"]]["meta-type"] == "enum"
    for entry in schema:  # every referenced type is described
        for key in ("arg-type", "ret-type", "element-type"):
            if key in entry:
                assert entry[key] in by_name, entry
        for m in entry.get("members", ()):
            if "type" in m:
                assert m["type"] in by_name, entry


def test_qmp_shell_hmp_mode(vm) -> None:
    """qemu.qmp's own ``qmp-shell -H`` connects (its completion runs ``help`` and ``info``) and works."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "qemu.qmp.qmp_shell", "-H", str(vm.qmp_path)],
                          input="info status\nstop\ninfo status\n", capture_output=True, text=True,
                          timeout=60, env=env)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "Welcome to the HMP shell!" in proc.stdout
    assert "VM status: running" in proc.stdout and "VM status: paused" in proc.stdout
    assert vm.cmd("query-status")["status"] == "paused"
