"""``migctl analyze``: a saved stream of migd's and one of a real QEMU, read section by section.

The reader (``migd/analyze.py``) is checked three ways: against what the stream's writer knows (the
machine's RAM, QEMU's ``pmemsave``), against a hand-made stream with a page sent as data and later as
ZERO, and against QEMU's own ``analyze-migration.py`` run as an oracle (``$MIGD_ANALYZE_MIGRATION``;
those comparisons skip when it is absent). QEMU's tests skip when QEMU or binutils are not installed.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash
from helpers import Migd
from qemu_guest import Qemu, build_floppy, missing_tools, outside_firmware, qemu_version

from migd.analyze import AnalyzeError, analyze
from migd.migration.format import (
    MAGIC,
    RAM_CONTINUE,
    RAM_EOS,
    RAM_MEM_SIZE,
    RAM_PAGE,
    RAM_ZERO,
    Section,
    idstr_bytes,
    section_footer,
    section_part,
    section_start,
    vmdesc_bytes,
)

REPO = Path(__file__).resolve().parent.parent
SCRIPT = os.environ.get("MIGD_ANALYZE_MIGRATION") or str(REPO.parent / "shared" / "tools" / "analyze-migration.py")
needs_script = pytest.mark.skipif(not os.path.isfile(SCRIPT),
                                  reason="QEMU's analyze-migration.py not found (set MIGD_ANALYZE_MIGRATION)")
needs_qemu = pytest.mark.skipif(missing_tools() is not None, reason=missing_tools() or "")


def migctl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "migd.migctl", *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=cwd)


def oracle_state(path: Path) -> dict[str, Any]:
    out = subprocess.run([sys.executable, SCRIPT, "-f", str(path), "-d", "state"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


def compare_with_oracle(path: Path) -> int:
    """Every section the script shows is one of ours with the same id; device fields agree. The number
    of integer fields compared."""
    ours = json.loads(migctl("analyze", "--json", str(path)).stdout)
    # migd's checksum records are described to QEMU's script as a device (so it can walk over them);
    # migctl analyze checks them as checksums instead of listing them
    theirs = {k: v for k, v in oracle_state(path).items() if not k.startswith("x-migd/checksum ")}
    first = {}  # (idstr, section id) of START/FULL sections, in stream order
    for s in ours["sections"]:
        if s["type"] in ("START", "FULL"):
            first[f"{s['idstr']} ({s['section_id']})"] = s
    assert list(theirs) == list(first), "the same sections, in the same order"
    ram_key = next(k for k in first if k.startswith("ram ("))
    sizes = {b["name"]: b["size"] for b in ours["ram_blocks"]}
    assert {k: int(v, 16) for k, v in theirs[ram_key]["section sizes"].items()} == sizes
    devices = {f"{d['name']} ({d['section_id']})": d for d in analyze(path).devices}
    compared = 0
    for key, fields in theirs.items():
        if key == ram_key:
            continue
        mine = devices[key]["fields"]
        for name, value in fields.items():
            if isinstance(value, str) and value.startswith("0x") and isinstance(mine.get(name), int):
                digits = value.split()[0]  # "0x%0*x", a signed value followed by " (-1)"
                assert int(digits, 16) == mine[name] % (1 << (4 * (len(digits) - 2))), (key, name, value)
                compared += 1
    return compared


# -- migd's own stream ----------------------------------------------------------------------------


@pytest.fixture
def migd_stream(migd_factory: Any, tmp_path: Path) -> tuple[Path, Migd]:
    src = migd_factory("src", "-m", "32M", "--workload", "random,rate=8M")
    state = tmp_path / "migd.state"
    src.cmd("migrate", uri=f"file:{state}")
    src.wait_for(lambda: src.cmd("query-migrate").get("status") == "completed", 60, "the save to complete")
    return state, src


def test_migd_stream_sections_blocks_and_devices(migd_stream: tuple[Path, Migd], tmp_path: Path) -> None:
    state, src = migd_stream
    out = migctl("analyze", "--json", str(state), "--extract", str(tmp_path / "x"))
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["machine_type"] == "migd"
    assert doc["commands"] == ["SWITCHOVER_START"]
    kinds = [s["type"] for s in doc["sections"] if s["idstr"] == "ram"]
    assert kinds[0] == "START" and kinds[-1] == "END" and set(kinds[1:-1]) <= {"PART"}
    fulls = [s for s in doc["sections"] if s["type"] == "FULL"]
    assert fulls and all(s.get("validated", True) for s in fulls)
    assert [(s["idstr"], s["instance_id"]) for s in fulls] == \
        [(d["name"], d["instance_id"]) for d in doc["vmdesc_devices"]]
    assert [s["size"] for s in fulls] == [d["size"] for d in doc["vmdesc_devices"]]
    (block,) = doc["ram_blocks"]
    assert block["name"] == "ram0" and block["size"] == 32 << 20 and block["unsent_pages"] == 0
    assert block["data_pages"] > 0 and block["zero_pages"] > 0
    assert block["data_pages"] + block["zero_pages"] == block["pages"]
    # the extracted block is the machine's RAM (the source stays paused after the save)
    (digest,) = src.cmd("x-migd-ram-digest")["blocks"]
    extracted = (tmp_path / "x" / "ram" / "ram0").read_bytes()
    assert xxhash.xxh3_128_hexdigest(extracted) == digest["digest"]
    devices = json.loads((tmp_path / "x" / "devices.json").read_text())
    assert [d["name"] for d in devices] == [s["idstr"] for s in fulls]
    assert all(d["fields"] for d in devices)
    # migd's checksum records (one after every section) are checked, not listed as devices
    assert doc["checksums"]["records"] > 0 and doc["checksums"]["bad"] == []


def test_a_flipped_bit_shows_in_the_checksums(migd_stream: tuple[Path, Migd], tmp_path: Path) -> None:
    state, _ = migd_stream
    data = bytearray(state.read_bytes())
    doc = json.loads(migctl("analyze", "--json", str(state)).stdout)
    page = next(s for s in doc["sections"] if s["idstr"] == "ram" and s["type"] == "PART" and s["size"] > 8192)
    data[page["offset"] + page["size"] // 2] ^= 0x10  # inside the page data of a PART section
    bad = tmp_path / "flipped"
    bad.write_bytes(bytes(data))
    out = migctl("analyze", "--json", str(bad))
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["checksums"]["bad"]) == 1


@needs_script
def test_migd_stream_agrees_with_qemus_script(migd_stream: tuple[Path, Migd], tmp_path: Path) -> None:
    state, _ = migd_stream
    assert compare_with_oracle(state) > 0
    x = tmp_path / "x"
    assert migctl("analyze", str(state), "--extract", str(x)).returncode == 0
    theirs = tmp_path / "oracle"
    theirs.mkdir()
    out = subprocess.run([sys.executable, SCRIPT, "-f", str(state), "-x"], capture_output=True, text=True,
                         timeout=120, cwd=theirs)
    assert out.returncode == 0, out.stderr
    assert (theirs / "ram0").read_bytes() == (x / "ram" / "ram0").read_bytes()


# -- a hand-made stream: data, then ZERO for the same page -------------------------------------------


def _stale_stream() -> bytes:
    out = MAGIC.to_bytes(4, "big") + (3).to_bytes(4, "big")
    out += bytes((Section.CONFIGURATION,)) + struct.pack(">I", 4) + b"migd"
    out += section_start(Section.START, 0, "ram", 0, 4)
    out += ((2 * 4096) | RAM_MEM_SIZE).to_bytes(8, "big") + idstr_bytes("blk") + (2 * 4096).to_bytes(8, "big")
    out += RAM_EOS.to_bytes(8, "big") + section_footer(0)
    out += section_part(Section.PART, 0)
    out += RAM_PAGE.to_bytes(8, "big") + idstr_bytes("blk") + b"\xab" * 4096
    out += (4096 | RAM_PAGE | RAM_CONTINUE).to_bytes(8, "big") + b"\xcd" * 4096
    out += RAM_EOS.to_bytes(8, "big") + section_footer(0)
    out += section_part(Section.END, 0)
    out += (RAM_ZERO).to_bytes(8, "big") + idstr_bytes("blk") + b"\0"
    out += RAM_EOS.to_bytes(8, "big") + section_footer(0)
    out += bytes((Section.EOF,))
    out += vmdesc_bytes(json.dumps({"page_size": 4096, "devices": []}).encode())
    return out


def test_a_page_sent_as_data_then_zero_is_extracted_zero(tmp_path: Path) -> None:
    path = tmp_path / "stale.state"
    path.write_bytes(_stale_stream())
    a = analyze(path, tmp_path / "x")
    stats = a.blocks["blk"].as_dict()
    assert (stats["page_records"], stats["zero_records"], stats["data_pages"], stats["zero_pages"]) == (2, 1, 1, 1)
    assert (tmp_path / "x" / "ram" / "blk").read_bytes() == bytes(4096) + b"\xcd" * 4096


@needs_script
def test_qemus_script_keeps_the_stale_page_where_migctl_does_not(tmp_path: Path) -> None:
    """The known difference (reference §3.5): the script does not write ZERO pages into its files."""
    path = tmp_path / "stale.state"
    path.write_bytes(_stale_stream())
    out = subprocess.run([sys.executable, SCRIPT, "-f", str(path), "-x"], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "blk").read_bytes()[:4096] == b"\xab" * 4096  # stale
    assert migctl("analyze", str(path), "--extract", str(tmp_path / "x")).returncode == 0
    assert (tmp_path / "x" / "ram" / "blk").read_bytes()[:4096] == bytes(4096)


@pytest.mark.parametrize("cut", [3, 30, 100, 4200])
def test_a_stream_cut_short_is_a_clear_error(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "cut.state"
    path.write_bytes(_stale_stream()[:cut])
    with pytest.raises(AnalyzeError) as info:
        analyze(path)
    assert "truncated" in str(info.value) or "too short" in str(info.value)
    out = migctl("analyze", str(path))
    assert out.returncode == 1 and "migctl:" in out.stderr and "Traceback" not in out.stderr


def test_a_huge_block_is_refused_before_anything_is_allocated(tmp_path: Path) -> None:
    data = bytearray(_stale_stream())
    at = data.index(idstr_bytes("blk") + (2 * 4096).to_bytes(8, "big"))
    huge = 1 << 62
    data[at - 8 : at] = (huge | RAM_MEM_SIZE).to_bytes(8, "big")
    data[at + 4 : at + 12] = huge.to_bytes(8, "big")
    path = tmp_path / "huge.state"
    path.write_bytes(bytes(data))
    with pytest.raises(AnalyzeError, match='Invalid length 0x4000000000000000 of RAM block "blk"'):
        analyze(path)


def test_not_a_stream(tmp_path: Path) -> None:
    path = tmp_path / "text"
    path.write_bytes(b"hello, this is not a migration stream")
    out = migctl("analyze", str(path))
    assert out.returncode == 1 and "Not a migration stream" in out.stderr


# -- a real QEMU's stream ---------------------------------------------------------------------------


@pytest.fixture
def qemu_stream(tmp_path: Path) -> Iterator[tuple[Path, bytes]]:
    """A QEMU guest saved to a file (``file:`` since QEMU 8.2, ``exec:cat`` before); its stopped RAM."""
    floppy = build_floppy(tmp_path)
    vm = Qemu(tmp_path, "qsrc", floppy)
    try:
        vm.wait_counting()
        state = tmp_path / "qemu.state"
        major, minor = (int(x) for x in qemu_version().split()[3].split(".")[:2])
        uri = f"file:{state}" if (major, minor) >= (8, 2) else f"exec:cat > {state}"
        vm.cmd("migrate", uri=uri)
        info = vm.wait_migration()
        assert info["status"] == "completed", info
        ram = vm.ram()
        yield state, ram
    finally:
        vm.kill()


@needs_qemu
def test_qemu_stream_sections_and_ram(qemu_stream: tuple[Path, bytes], tmp_path: Path) -> None:
    state, ram = qemu_stream
    x = tmp_path / "x"
    out = migctl("analyze", "--json", str(state), "--extract", str(x))
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["machine_type"].startswith("pc-i440fx-")
    names = {b["name"]: b for b in doc["ram_blocks"]}
    assert names["pc.ram"]["size"] == 32 << 20 and "pc.bios" in names
    fulls = [s for s in doc["sections"] if s["type"] == "FULL"]
    assert len(fulls) > 10 and all(s.get("validated", True) for s in fulls), "every device ended by its footer"
    assert {(s["idstr"], s["instance_id"]) for s in fulls} == \
        {(d["name"], d["instance_id"]) for d in doc["vmdesc_devices"]}
    assert outside_firmware((x / "ram" / "pc.ram").read_bytes()) == outside_firmware(ram)
    devices = json.loads((x / "devices.json").read_text())
    cpu = next(d for d in devices if d["name"] == "cpu")
    assert isinstance(cpu["fields"]["env.eip"], int)
    human = migctl("analyze", str(state))
    assert human.returncode == 0 and "pc.ram" in human.stdout and "0000:00:01.3/piix4_pm" in human.stdout


@needs_qemu
@needs_script
def test_qemu_stream_agrees_with_qemus_script(qemu_stream: tuple[Path, bytes]) -> None:
    state, _ = qemu_stream
    assert compare_with_oracle(state) > 50



def test_mutated_streams_are_analysis_errors_only(tmp_path: Path) -> None:
    """migctl analyze on damaged files: an AnalyzeError (exit 1, one line) or a result, never a crash."""
    base = _stale_stream()
    rng = np.random.default_rng(3)
    refused = 0
    path = tmp_path / "m.state"
    for _ in range(400):
        data = bytearray(base)
        for _ in range(int(rng.integers(1, 4))):
            data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
        if rng.random() < 0.2:
            data = data[: int(rng.integers(0, len(data)))]
        path.write_bytes(bytes(data))
        try:
            analyze(path, tmp_path / "x")
        except AnalyzeError:
            refused += 1
    assert refused > 0
