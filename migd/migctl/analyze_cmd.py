"""``migctl analyze FILE``: what a saved migration stream holds (sections, RAM blocks, devices).

Runs locally on the file (no daemon, no socket); the reading itself is ``migd.analyze``.
"""

from __future__ import annotations

import argparse

from rich.table import Table

from migd.analyze import Analysis, AnalyzeError, analyze
from migd.migctl.output import Output

EXIT_BAD_STREAM = 1


def add_analyze_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="a stream saved with migrate file:... (QEMU's or migd's)")
    p.add_argument("--extract", metavar="DIR",
                   help="write each RAM block to DIR/ram/<name>, device state to DIR/devices.json")


def run_analyze(args: argparse.Namespace, out: Output) -> int:
    """Analyze the file and print the result (a table, or one JSON document with --json)."""
    try:
        result = analyze(args.file, args.extract)
    except AnalyzeError as exc:
        out.error(str(exc))
        return EXIT_BAD_STREAM
    if out.json_mode:
        out.data(result.as_dict())
    else:
        _show(result, out)
    return 0


def _show(a: Analysis, out: Output) -> None:
    out.line(f"{a.path}: {a.file_size} bytes, machine type {a.machine_type or '(no configuration)'}"
             + (f", commands {', '.join(a.commands)}" if a.commands else ""))
    sections = Table(title="sections")
    for col in ("type", "id", "idstr", "instance", "version", "size"):
        sections.add_column(col, justify="right" if col in ("id", "instance", "version", "size") else "left")
    for s in a.sections:
        sections.add_row(s.type, str(s.section_id), s.idstr, str(s.instance_id), str(s.version_id),
                         str(s.size) + ("" if s.validated else " ?"))
    out.show(sections)
    blocks = Table(title="RAM blocks")
    for col in ("block", "size", "data pages", "zero pages", "unsent", "PAGE records", "ZERO records"):
        blocks.add_column(col, justify="left" if col == "block" else "right")
    for b in a.blocks.values():
        d = b.as_dict()
        blocks.add_row(b.name, str(b.size), str(d["data_pages"]), str(d["zero_pages"]), str(d["unsent_pages"]),
                       str(b.page_records), str(b.zero_records))
    out.show(blocks)
    devices = Table(title="devices (VMDESCRIPTION)" if a.vmdesc is not None else "devices (no VMDESCRIPTION)")
    for col in ("name", "instance", "vmsd", "version", "size"):
        devices.add_column(col, justify="right" if col in ("instance", "version", "size") else "left")
    for d in a.as_dict()["vmdesc_devices"]:
        devices.add_row(str(d["name"]), str(d["instance_id"]), str(d["vmsd_name"]), str(d["version"]),
                        str(d["size"]))
    out.show(devices)
