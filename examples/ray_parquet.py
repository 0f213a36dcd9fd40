"""Embed a Parquet corpus (columns ``id``, ``text``) with Ray Data into Parquet files.

    python examples/ray_parquet.py docs.parquet vectors/ --target dns:///embedding-grpc:50051
    python examples/ray_parquet.py docs.parquet vectors/ --in-process --actors 4

Service mode sends the texts to a fleet of servers (batch priority, retries,
broken streams resumed); in-process mode loads the model in each Ray actor
(needs the ``embedding-server`` distribution on the workers). tests/test_ray.py runs this file.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import ray
from embedding_client.ray import EmbedBatches


def embed_parquet(
    source: str,
    destination: str,
    *,
    target: str | None = None,
    engine_args: Sequence[str] | None = None,
    actors: int = 2,
    batch_size: int = 1024,
) -> None:
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # rows in input order
    dataset = ray.data.read_parquet(source)
    dataset = dataset.repartition(target_num_rows_per_block=batch_size)  # blocks for every actor
    dataset = dataset.map_batches(
        EmbedBatches,
        fn_constructor_kwargs={"target": target, "engine_args": engine_args},
        batch_format="pyarrow",
        batch_size=batch_size,
        concurrency=actors,
        num_cpus=1 if engine_args is not None else 0.25,  # a client actor mostly waits
    )
    dataset.write_parquet(destination)  # id, text, embedding: fixed_size_list<float32>[d]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="Parquet file or directory with id and text columns")
    parser.add_argument("destination", help="directory for the Parquet output")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--target", help="gRPC target of the servers (service mode)")
    mode.add_argument("--in-process", action="store_true", help="load the model in each actor")
    parser.add_argument("--model", action="append", default=[], help="in-process: [NAME=]PATH, as the server")
    parser.add_argument("--actors", type=int, default=2, help="Ray actors (default 2)")
    args = parser.parse_args(argv)
    engine_args = [flag for path in args.model for flag in ("--model", path)] if args.in_process else None
    ray.init()
    embed_parquet(
        args.source, args.destination, target=args.target, engine_args=engine_args, actors=args.actors
    )


if __name__ == "__main__":
    main()
