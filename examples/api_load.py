"""Load a published model across a Ray cluster with the Python API and hand the shards to an engine.

    python examples/api_load.py redis://loader@redis.internal:6379/0 llama-3-8b --tp 8 --password-env REDIS_PASSWORD

The engine hand-off is ``loaded.run(fn, *args)``: ``fn(rank, tensors, *args)`` runs inside each rank's actor, next to
its shard (build the TP module there); results come back in rank order. Shards never travel through the driver.
"""

from __future__ import annotations

import argparse
import os

import raydist_loader as rl


def describe_shard(rank: int, tensors: dict, prefix: str) -> dict:
    """Runs on each actor: what an engine would build its TP layers from."""
    chosen = {k: (tuple(v.shape), str(v.dtype), str(v.device)) for k, v in tensors.items() if k.startswith(prefix)}
    return {"rank": rank, "tensors": len(tensors), "bytes": sum(v.nbytes for v in tensors.values()), "sample": chosen}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("model")
    parser.add_argument("--tp", type=int, default=8)
    parser.add_argument("--password-env", help="environment variable holding the store's password")
    parser.add_argument("--ray-address", default=None, help="default: RAY_ADDRESS, a local cluster, or a new one")
    args = parser.parse_args()
    options = {"password": os.environ[args.password_env]} if args.password_env else None

    print(rl.inspect(args.url, args.model, tp=args.tp, connector_options=options)["ranks"])
    with rl.load_across_cluster(args.model, args.url, tp=args.tp, ray_address=args.ray_address,
                                connector_options=options) as loaded:
        total = loaded.report.total
        print(f"{total.bytes / 1e9:.2f} GB in {total.seconds:.2f} s ({total.gbps:.2f} GB/s), "
              f"verified={loaded.report.verified}, ready after {total.time_to_ready_s:.1f} s")
        for row in loaded.run(describe_shard, "model.layers.0.self_attn."):
            print(row)


if __name__ == "__main__":
    main()
