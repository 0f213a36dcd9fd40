"""What a session run costs in memory: the numbers behind models/sessions.py and engine/memory.py.

``memory_budget.py``: ONNX Runtime's CPU memory arena on or off, peak RSS and
speed, default model, 2 concurrent runs; each setting in a fresh process
(peak RSS is per process), alternating rounds, medians side by side.

``memory_budget.py shapes``: the RSS growth of one run of B x T (arena off),
for several shapes, next to what ``ModelShape.run_bytes`` plans for it.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

ROUNDS = 2
CASES = {"long 32x256": (32, 256), "mid 32x64": (32, 64), "short 4x12": (4, 12)}


def child(arena: str, extend: str) -> None:
    import re
    import threading
    from pathlib import Path

    import numpy as np
    import onnxruntime as ort
    from embedding_server.models.loader import builtin_files
    from embedding_server.models.sessions import session_options

    options = session_options(1)
    options.enable_cpu_mem_arena = arena == "on"
    if extend:
        options.add_session_config_entry("arena_extend_strategy", extend)
    session = ort.InferenceSession(str(builtin_files().onnx), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    results = {}
    for label, (batch, length) in CASES.items():
        feeds = {
            name: (np.ones if name == "attention_mask" else np.zeros)((batch, length), dtype=np.int64)
            for name in names
        }
        feeds["input_ids"] = np.random.default_rng(0).integers(1000, 20000, (batch, length), dtype=np.int64)

        def work(feeds=feeds) -> None:
            for _ in range(3):
                session.run(None, feeds)

        started = time.perf_counter()
        threads = [threading.Thread(target=work) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        results[label] = (time.perf_counter() - started) / 6 / (batch * length) * 1e6
    status = Path("/proc/self/status").read_text()
    results["peak_mib"] = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024
    print(json.dumps(results))


def main() -> None:
    settings = [("on", ""), ("off", "")]
    rows: dict[str, list[dict]] = {f"arena {a}": [] for a, _ in settings}
    for _ in range(ROUNDS):
        for arena, extend in settings:
            out = subprocess.run(
                [sys.executable, __file__, "child", arena, extend], capture_output=True, text=True, check=True
            )
            rows[f"arena {arena}"].append(json.loads(out.stdout))
    keys = [*CASES, "peak_mib"]
    print("setting      " + "  ".join(f"{k:>14}" for k in keys) + "   (us per padded token; peak RSS MiB)")
    for name, runs in rows.items():
        print(f"{name:12} " + "  ".join(f"{statistics.median(r[k] for r in runs):14.1f}" for k in keys))


SHAPES = ((16, 32), (256, 32), (16, 128), (64, 128), (4, 512), (16, 512))


def shape_child(batch: int, length: int) -> None:
    import re
    from pathlib import Path

    import numpy as np
    import onnxruntime as ort
    from embedding_server.models.loader import builtin_files
    from embedding_server.models.sessions import session_options

    def status(key: str) -> float:
        text = Path("/proc/self/status").read_text()
        return int(re.search(rf"{key}:\s+(\d+)", text).group(1)) * 1024  # type: ignore[union-attr]

    session = ort.InferenceSession(
        str(builtin_files().onnx), session_options(1), providers=["CPUExecutionProvider"]
    )
    session.run(None, {i.name: np.ones((1, 8), np.int64) for i in session.get_inputs()})
    base = status("VmRSS")
    session.run(None, {i.name: np.ones((batch, length), np.int64) for i in session.get_inputs()})
    print(json.dumps({"grow": status("VmHWM") - base}))


def shapes() -> None:
    from embedding_server.engine.memory import ModelShape

    planned = ModelShape(hidden=384, heads=12)
    print("B x T        measured MiB  planned MiB  planned/measured")
    for batch, length in SHAPES:
        out = subprocess.run(
            [sys.executable, __file__, "shape", str(batch), str(length)],
            capture_output=True,
            text=True,
            check=True,
        )
        grow = json.loads(out.stdout)["grow"] / 2**20
        plan = planned.run_bytes(batch, length) / 2**20
        print(f"{batch:4d} x {length:<4d} {grow:14.0f} {plan:12.0f} {plan / grow:17.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "shape":
        shape_child(int(sys.argv[2]), int(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "shapes":
        shapes()
    elif len(sys.argv) > 1 and sys.argv[1] == "child":
        child(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "")
    else:
        main()
