"""Migration parameters and capabilities: QEMU 10.0's names, defaults, ranges and error texts."""

from __future__ import annotations

import pytest

from migd.migration.params import (
    CAPABILITIES,
    DEFAULT_PARAMETERS,
    MigrationConfig,
    ParamError,
)
from migd.qmp.commands.migration import MigrateSetCapabilitiesArgs, MigrateSetParametersArgs
from migd.qmp.registry import QMPError
from migd.qmp.schema import validate

QEMU_10_PARAMETER_ORDER = [
    "announce-initial", "announce-max", "announce-rounds", "announce-step",
    "throttle-trigger-threshold", "cpu-throttle-initial", "cpu-throttle-increment",
    "cpu-throttle-tailslow", "tls-creds", "tls-hostname", "tls-authz", "max-bandwidth",
    "avail-switchover-bandwidth", "downtime-limit", "x-checkpoint-delay", "multifd-channels",
    "xbzrle-cache-size", "max-postcopy-bandwidth", "max-cpu-throttle", "multifd-compression",
    "multifd-zlib-level", "multifd-qatzip-level", "multifd-zstd-level", "x-vcpu-dirty-limit-period",
    "vcpu-dirty-limit", "mode", "zero-page-detection", "direct-io",
]


def test_query_parameters_lists_qemu_10_members_with_defaults() -> None:
    params = MigrationConfig().query_parameters()
    # block-bitmap-mapping only once set; migd's own x-migd-* members follow QEMU's
    assert [k for k in params if not k.startswith("x-migd-")] == QEMU_10_PARAMETER_ORDER
    assert list(params)[: len(QEMU_10_PARAMETER_ORDER)] == QEMU_10_PARAMETER_ORDER
    assert params["x-migd-peer-timeout"] == 10
    assert params["max-bandwidth"] == 134217728
    assert params["downtime-limit"] == 300
    assert params["avail-switchover-bandwidth"] == 0
    assert params["throttle-trigger-threshold"] == 50
    assert params["cpu-throttle-initial"] == 20
    assert params["cpu-throttle-increment"] == 10
    assert params["max-cpu-throttle"] == 99
    assert params["xbzrle-cache-size"] == 64 << 20
    assert params["tls-creds"] == params["tls-hostname"] == params["tls-authz"] == ""
    assert params["multifd-compression"] == "none"
    assert params["zero-page-detection"] == "multifd"


def test_set_parameters_commits_and_reports_changes() -> None:
    cfg = MigrationConfig()
    changed = cfg.set_parameters({"max-bandwidth": 0, "downtime-limit": 50, "tls-creds": None})
    assert changed == {"max-bandwidth": 0, "downtime-limit": 50}
    assert cfg.param("max-bandwidth") == 0 and cfg.param("downtime-limit") == 50
    assert cfg.param("tls-creds") == ""  # StrOrNull: null means ""
    cfg.set_parameters({"block-bitmap-mapping": [{"node-name": "d0", "alias": "a", "bitmaps": []}]})
    assert cfg.query_parameters()["block-bitmap-mapping"][0]["alias"] == "a"


@pytest.mark.parametrize(
    ("changes", "text"),
    [
        ({"throttle-trigger-threshold": 0},
         "Parameter 'throttle_trigger_threshold' expects an integer in the range of 1 to 100"),
        ({"throttle-trigger-threshold": 101},
         "Parameter 'throttle_trigger_threshold' expects an integer in the range of 1 to 100"),
        ({"cpu-throttle-initial": 0}, "Parameter 'cpu_throttle_initial' expects an integer in the range of 1 to 99"),
        ({"cpu-throttle-increment": 100},
         "Parameter 'cpu_throttle_increment' expects an integer in the range of 1 to 99"),
        ({"downtime-limit": 2000001}, "Parameter 'downtime_limit' expects an integer in the range of 0 to 2000000 ms"),
        ({"multifd-channels": 0}, "Parameter 'multifd_channels' expects a value between 1 and 255"),
        ({"multifd-zlib-level": 10}, "Parameter 'multifd_zlib_level' expects a value between 0 and 9"),
        ({"multifd-qatzip-level": 0}, "Parameter 'multifd_qatzip_level' expects a value between 1 and 9"),
        ({"multifd-zstd-level": 21}, "Parameter 'multifd_zstd_level' expects a value between 0 and 20"),
        ({"xbzrle-cache-size": 5000},
         "Parameter 'xbzrle_cache_size' expects a power of two no less than the target page size"),
        ({"xbzrle-cache-size": 2048},
         "Parameter 'xbzrle_cache_size' expects a power of two no less than the target page size"),
        ({"max-cpu-throttle": 10},
         "Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial to 99"),
        ({"announce-initial": 100001}, "Parameter 'announce_initial' expects a value between 0 and 100000"),
        ({"announce-max": 100001}, "Parameter 'announce_max' expects a value between 0 and 100000"),
        ({"announce-rounds": 1001}, "Parameter 'announce_rounds' expects a value between 0 and 1000"),
        ({"announce-step": 0}, "Parameter 'announce_step' expects a value between 0 and 10000"),
        ({"x-vcpu-dirty-limit-period": 0}, "Parameter 'x-vcpu-dirty-limit-period' expects a value between 1 and 1000"),
        ({"vcpu-dirty-limit": 0}, "Parameter 'vcpu_dirty_limit' expects is invalid, it must greater then 1 MB/s"),
        ({"direct-io": True}, "No build-time support for direct-io"),
        ({"multifd-compression": "lz4"}, "Parameter 'multifd-compression' does not accept value 'lz4'"),
        ({"max-bandwidth": "fast"}, "Invalid parameter type for 'max-bandwidth', expected: size"),
        ({"cpu-throttle-initial": 256}, "Parameter 'cpu-throttle-initial' expects uint8"),
        ({"no-such": 1}, "Parameter 'no-such' is unexpected"),
    ],
)
def test_bad_parameter_is_refused_with_qemu_text_and_changes_nothing(changes: dict, text: str) -> None:
    cfg = MigrationConfig()
    before = cfg.query_parameters()
    # a valid member in the same call must not be committed either (validated as a whole)
    with pytest.raises(ParamError) as err:
        cfg.set_parameters({"max-bandwidth": 1, **changes})
    assert str(err.value) == text
    assert cfg.query_parameters() == before


def test_checks_apply_to_the_merged_set() -> None:
    cfg = MigrationConfig()
    cfg.set_parameters({"cpu-throttle-initial": 30, "max-cpu-throttle": 40})
    with pytest.raises(ParamError, match="max_cpu_throttle"):
        cfg.set_parameters({"cpu-throttle-initial": 50})  # would exceed the committed max
    assert cfg.param("cpu-throttle-initial") == 30


def test_qmp_argument_model_uses_qemu_visitor_texts() -> None:
    args = validate(MigrateSetParametersArgs, {"max-bandwidth": 0, "downtime-limit": 10, "tls-authz": None})
    assert args.max_bandwidth == 0 and args.downtime_limit == 10 and args.tls_authz is None
    assert args.model_fields_set == {"max_bandwidth", "downtime_limit", "tls_authz"}
    cases = {
        "cpu-throttle-initial": (300, "Parameter 'cpu-throttle-initial' expects uint8"),
        "downtime-limit": (True, "Invalid parameter type for 'downtime-limit', expected: integer"),
        "mode": ("cpr-x", "Parameter 'mode' does not accept value 'cpr-x'"),
        "x-no-such": (1, "Parameter 'x-no-such' is unexpected"),
    }
    for name, (value, text) in cases.items():
        with pytest.raises(QMPError) as err:
            validate(MigrateSetParametersArgs, {name: value})
        assert err.value.desc == text


def test_every_parameter_has_a_qmp_member() -> None:
    wire = {f.alias for f in MigrateSetParametersArgs.model_fields.values()}
    assert wire == set(DEFAULT_PARAMETERS)


def test_capabilities_are_qemu_10_list_in_order_with_migd_defaults() -> None:
    caps = MigrationConfig().query_capabilities()
    assert [c["capability"] for c in caps] == list(CAPABILITIES)
    assert CAPABILITIES[:5] == ("xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "events")
    assert CAPABILITIES[-1] == "mapped-ram" and len(CAPABILITIES) == 22
    on = {c["capability"] for c in caps if c["state"]}
    assert on == {"return-path"}  # migd: acknowledged completion by default


def test_supported_capabilities_switch_and_unsupported_are_refused() -> None:
    cfg = MigrationConfig()
    cfg.set_capabilities([("events", True), ("auto-converge", True), ("pause-before-switchover", True),
                          ("return-path", False), ("xbzrle", False)])
    assert cfg.cap("events") and cfg.cap("auto-converge") and cfg.cap("pause-before-switchover")
    assert not cfg.cap("return-path")
    with pytest.raises(ParamError) as err:
        cfg.set_capabilities([("events", False), ("xbzrle", True)])
    assert str(err.value) == "Capability 'xbzrle' is not supported by migd"
    assert cfg.cap("events")  # nothing of the refused call was applied


def test_capability_argument_model() -> None:
    args = validate(MigrateSetCapabilitiesArgs, {"capabilities": [{"capability": "events", "state": True}]})
    assert args.capabilities[0].capability == "events"
    with pytest.raises(QMPError) as err:
        validate(MigrateSetCapabilitiesArgs, {"capabilities": [{"capability": "turbo", "state": True}]})
    assert err.value.desc == "Parameter 'capability' does not accept value 'turbo'"
    with pytest.raises(QMPError) as err:
        validate(MigrateSetCapabilitiesArgs, {"capabilities": [{"capability": "events"}]})
    assert err.value.desc == "Parameter 'capabilities[0].state' is missing"
