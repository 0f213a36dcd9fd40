"""The fidelity report written beside every int8 model (JSON for machines, Markdown for people)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..models.files import QUANTIZATION_REPORT

REPORT_JSON = QUANTIZATION_REPORT
REPORT_MD = "quantization_report.md"


def read_report(directory: Path) -> dict[str, Any] | None:
    path = directory / REPORT_JSON
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def readable(report: dict[str, Any]) -> str:
    """The report as Markdown: verdict, per-output table, kept nodes and speed."""
    floor = report["floor"]
    lines = [
        f"# int8 quantization report: {report['model']}",
        "",
        f"- source: `{report['source']}` (sha256 {report['source_sha256']})",
        f"- method: {report['method']}",
        f"- calibration: {report['calibration']['texts']} texts from {report['calibration']['source']}",
        f"- floor: min cosine >= {floor['min']}, mean >= {floor['mean']} for every output",
        f"- verdict: **{'within the floor' if report['passed'] else 'BELOW THE FLOOR (forced)'}**"
        f" (worst: {report['worst']['output']}, min cosine {report['worst']['min']:.5f})",
        "",
        "| output | texts/rows | min | p1 | mean |",
        "|---|---|---|---|---|",
    ]
    for name, s in report["outputs"].items():
        lines.append(f"| {name} | {s['count']} | {s['min']:.5f} | {s['p1']:.5f} | {s['mean']:.5f} |")
    kept = report["kept_fp32"]
    lines += [
        "",
        f"{len(report['quantized'])} MatMuls int8, {len(kept)} kept fp32"
        + (": " + ", ".join(f"`{name}`" for name in kept) if kept else "."),
    ]
    speed = report.get("speed")
    if speed:
        lines += [
            "",
            f"Speed on one thread, {speed['batch']}: fp32 {speed['fp32_ms']:.1f} ms, "
            f"all MatMuls int8 {speed['all_int8_ms']:.1f} ms, as written {speed['int8_ms']:.1f} ms "
            f"({speed['speedup']:.2f}x fp32; keeping nodes fp32 cost "
            f"{speed['kept_cost']:.0%}).",
        ]
    return "\n".join(lines) + "\n"


def write_report(directory: Path, report: dict[str, Any]) -> None:
    (directory / REPORT_JSON).write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    (directory / REPORT_MD).write_text(readable(report), encoding="utf-8")
