"""calc-dirty-rate / query-dirty-rate against a real daemon: QEMU's answers, texts and a rate that
matches the workload's."""

from __future__ import annotations

from helpers import wait_for

MIB = 1 << 20


def _measured(vm, **query):
    return wait_for(lambda: (lambda i: i if i["status"] == "measured" else None)(vm.cmd("query-dirty-rate", **query)),
                    30, 0.05, "the dirty rate measured")


def test_unstarted_then_page_sampling_sees_the_workload(migd_factory) -> None:
    vm = migd_factory("vm", "-m", "256M", "--workload", "random,rate=32M")
    assert vm.cmd("query-dirty-rate") == {"status": "unstarted", "start-time": 0, "calc-time": 0,
                                          "calc-time-unit": "second", "sample-pages": 0,
                                          "mode": "page-sampling"}
    assert vm.cmd("calc-dirty-rate", **{"calc-time": 1}) == {}
    info = vm.cmd("query-dirty-rate")
    assert info["status"] == "measuring" and "dirty-rate" not in info and info["sample-pages"] == 512
    assert vm.cmd_error("calc-dirty-rate", **{"calc-time": 1})["desc"] == "the dirty rate is already being measured."
    info = _measured(vm)
    assert set(info) == {"status", "dirty-rate", "start-time", "calc-time", "calc-time-unit", "sample-pages", "mode"}
    assert info["calc-time"] == 1 and info["mode"] == "page-sampling" and info["start-time"] > 0
    assert 4 <= info["dirty-rate"] <= 200, info  # 32 MiB/s of random pages, 128 pages sampled
    ms = vm.cmd("query-dirty-rate", **{"calc-time-unit": "millisecond"})
    assert ms["calc-time-unit"] == "millisecond" and 1000 <= ms["calc-time"] < 3000


def test_dirty_bitmap_mode_compares_every_page(migd_factory) -> None:
    vm = migd_factory("vm", "-m", "64M", "--workload", "random,rate=16M")  # small: page-sampling skips it
    vm.cmd("calc-dirty-rate", **{"calc-time": 500, "calc-time-unit": "millisecond", "mode": "dirty-bitmap"})
    info = _measured(vm, **{"calc-time-unit": "millisecond"})
    assert info["mode"] == "dirty-bitmap" and info["sample-pages"] == 0
    assert 4 <= info["dirty-rate"] <= 64, info
    vm.cmd("calc-dirty-rate", **{"calc-time": 1})
    assert _measured(vm)["dirty-rate"] == 0  # 64 MiB is below page-sampling's 128 MiB block minimum


def test_idle_guest_and_refusals_in_qemus_words(migd_factory) -> None:
    vm = migd_factory("vm", "-m", "256M")
    cases = [
        ({"calc-time": 0}, "Calculation time is out of range [50ms, 60000ms]."),
        ({"calc-time": 61}, "Calculation time is out of range [50ms, 60000ms]."),
        ({"calc-time": 49, "calc-time-unit": "millisecond"}, "Calculation time is out of range [50ms, 60000ms]."),
        ({"calc-time": 1, "sample-pages": 512, "mode": "dirty-bitmap"},
         "sample-pages is used only in page-sampling mode"),
        ({"calc-time": 1, "sample-pages": 127}, "sample-pages is out of range[128, 16384]."),
        ({"calc-time": 1, "mode": "dirty-ring"}, "mode dirty-ring is not enabled, use other method instead."),
    ]
    for args, text in cases:
        assert vm.cmd_error("calc-dirty-rate", **args) == {"class": "GenericError", "desc": text}
    assert vm.cmd("query-dirty-rate")["status"] == "unstarted"  # a refusal changes nothing
    vm.cmd("calc-dirty-rate", **{"calc-time": 100, "calc-time-unit": "millisecond", "sample-pages": 1024})
    info = _measured(vm)
    assert info["dirty-rate"] == 0 and info["sample-pages"] == 1024 and info["calc-time"] == 0
