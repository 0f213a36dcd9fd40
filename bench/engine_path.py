"""The engine path alone, in-process: what the server does for a call besides gRPC, side by side.

    python bench/engine_path.py
    python bench/engine_path.py --before /tmp/old-checkout --rounds 6

bench/serving_path.py measures the whole served call against a bare
``grpc.aio`` service; this takes gRPC away. Each round is a fresh process
that builds the Embedder of the same tiny synthetic bge-m3 (a model run costs
~0.1 ms) with default flags and drives it the way the servicer does:
``EmbeddingServicer.embed_result`` (validation, admission, tokenizing, the
queue, batching, the run, the finish step) and ``convert.encoded_response``
(the reply's bytes), from concurrent coroutines on one uvloop loop. Our
server's cost per text is about the bare service's plus this.

It prints texts/s and CPU microseconds per text (every thread, user +
system) of each load, for this checkout and (``--before``) another one's
``server/`` and ``client/`` code, rounds alternating which goes first, and
their ratio per round; and each one's peak RSS. The minimum CPU per text is
the steadier figure on a shared machine (other tenants only ever add).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from common import checkout_env  # noqa: E402

#: (name, concurrent callers, inputs per call)
LOADS = [("16 x 8", 16, 8), ("16 x 1", 16, 1), ("1 x 1", 1, 1)]


async def drive(clients: int, per_call: int, seconds: float) -> dict[str, float]:
    """One load on a freshly built engine (the code on ``sys.path``): texts/s and CPU per text."""
    from embedding_client.proto import embedding_pb2 as pb
    from embedding_server.compose import build_embedder
    from embedding_server.grpc_api import convert
    from embedding_server.grpc_api.servicer import EmbeddingServicer
    from embedding_server.grpc_api.state import Phase, ServingState
    from embedding_server.models.types import Priority
    from embedding_server.settings import parse_settings
    from serving_path import short_texts

    from tests.support.synthetic import make_bge_m3_aapot

    with tempfile.TemporaryDirectory(prefix="engine-path-") as work:
        model = make_bge_m3_aapot(Path(work) / "bge-m3").path
        embedder = build_embedder(parse_settings(["--model", f"bge-m3={model}"], {}))
        await embedder.start()
        state = ServingState()
        state.embedder, state.phase = embedder, Phase.SERVING
        servicer = EmbeddingServicer(state)
        texts = short_texts()
        requests = [
            pb.EmbedRequest(inputs=texts[i : i + per_call], request_id=str(i))
            for i in range(0, len(texts) - per_call, per_call)
        ]
        done = 0
        end = 0.0

        async def caller(offset: int) -> None:
            nonlocal done
            number = offset
            while time.monotonic() < end:
                request = requests[number % len(requests)]
                number += clients
                result = await servicer.embed_result(request, None, Priority.INTERACTIVE, "flow")
                convert.encoded_response(request.request_id, result)
                done += len(request.inputs)

        for measured in (False, True):  # a warm-up first: caches, the batcher's run costs
            done = 0
            end = time.monotonic() + (seconds if measured else min(1.0, seconds / 4))
            started, cpu = time.monotonic(), time.process_time()
            await asyncio.gather(*(caller(c) for c in range(clients)))
            elapsed, cpu = time.monotonic() - started, time.process_time() - cpu
        await embedder.close()
    return {"rate": done / elapsed, "cpu": cpu / done * 1e6}


def child(load: int, seconds: float) -> None:
    import uvloop

    _, clients, per_call = LOADS[load]
    result = uvloop.run(drive(clients, per_call, seconds))
    result["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result), flush=True)


def run_round(checkout: Path | None, load: int, seconds: float) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", str(load), "--seconds", str(seconds)]
    out = subprocess.run(command, env=checkout_env(checkout), capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{checkout or 'this checkout'}: {out.stderr[-2000:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loads", default="1,2,3", help="which loads, by number (1-3)")
    parser.add_argument("--before", type=Path, help="another checkout's engine beside this one")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.seconds)
        return
    sides: dict[str, Path | None] = {"this": None}
    if args.before:
        sides["before"] = args.before
    print(
        f"in-process engine path, tiny bge-m3, {args.rounds} rounds of {args.seconds:g} s per load and side"
    )
    print()
    header = " | ".join(f"{side} texts/s | {side} CPU/text (min, median)" for side in sides)
    ratio = " | this / before, texts/s (median) | this / before, min CPU/text" if args.before else ""
    print(f"| load | {header}{ratio} |")
    print("|---" * (1 + 2 * len(sides) + (2 if args.before else 0)) + "|")
    rss: dict[str, float] = dict.fromkeys(sides, 0.0)
    for number in (int(n) - 1 for n in args.loads.split(",")):
        results: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
        for round_ in range(args.rounds):
            for side in list(sides) if round_ % 2 == 0 else list(sides)[::-1]:
                results[side].append(run_round(sides[side], number, args.seconds))
        cells = []
        for side in sides:
            rates = [r["rate"] for r in results[side]]
            cpus = [r["cpu"] for r in results[side]]
            rss[side] = max(rss[side], *(r["rss"] for r in results[side]))
            cells.append(f"{min(rates):,.0f}-{max(rates):,.0f}")
            cells.append(f"{min(cpus):.1f}, {statistics.median(cpus):.1f} us")
        if args.before:
            ratios = [t["rate"] / b["rate"] for t, b in zip(results["this"], results["before"], strict=True)]
            cells.append(f"{min(ratios):.2f}-{max(ratios):.2f} ({statistics.median(ratios):.2f})")
            best = min(r["cpu"] for r in results["this"]) / min(r["cpu"] for r in results["before"])
            cells.append(f"{best:.2f}")
        print(f"| {LOADS[number][0]} | {' | '.join(cells)} |", flush=True)
    print()
    print("peak RSS: " + ", ".join(f"{side} {rss[side]:.0f} MiB" for side in sides))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
