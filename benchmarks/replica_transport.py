"""How replicas move shared bytes between two actors: Ray's object store vs Ray Direct Transport (gloo), on one node.

    python -m benchmarks.replica_transport [--mib 256] [--part-mib 64] [--runs 3]

Actor A holds ``--mib`` MiB in a torch uint8 tensor; actor B copies it, part by part, into its own preallocated
tensor (what a receiving replica does with a part). Object store: A ``ray.put``s each part as a numpy array and
returns the ref nested in a list, B ``ray.get``s it (a zero-copy view on the same node) and copies it in. RDT: A's
method has ``tensor_transport="gloo"`` and returns the tensor, B receives it as an argument (a collective group of
A and B over gloo) and copies it in. Prints GB/s per run and way, interleaved. CPU tensors only: NCCL/NIXL need GPUs.
"""

from __future__ import annotations

import argparse
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--part-mib", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)

    import ray
    import torch
    from ray.experimental.collective import create_collective_group

    size, part = args.mib << 20, args.part_mib << 20
    parts = size // part

    @ray.remote(num_cpus=0.25, max_concurrency=4)
    class Peer:
        def __init__(self):
            self.data = torch.randint(0, 255, (size,), dtype=torch.uint8)
            self.arena = torch.empty(size, dtype=torch.uint8)

        def put(self, i: int) -> list:
            return [ray.put(self.data[i * part : (i + 1) * part].numpy())]

        @ray.method(tensor_transport="gloo")
        def send(self, i: int) -> torch.Tensor:
            return self.data[i * part : (i + 1) * part]

        def take(self, i: int, wrapped: list) -> None:
            self.arena[i * part : (i + 1) * part].copy_(torch.from_numpy(ray.get(wrapped[0])))

        def receive(self, i: int, tensor: torch.Tensor) -> None:
            self.arena[i * part : (i + 1) * part].copy_(tensor)

        def checksum(self, which: str) -> int:
            return int(getattr(self, which).sum())

    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        a, b = Peer.remote(), Peer.remote()
        create_collective_group([a, b], backend="torch_gloo")

        def object_store() -> None:
            ray.get([b.take.remote(i, ray.get(a.put.remote(i))) for i in range(parts)])

        def direct() -> None:
            ray.get([b.receive.remote(i, a.send.remote(i)) for i in range(parts)])

        ways = {"object store": object_store, "RDT gloo": direct}
        for way in ways.values():  # warm up (connections, collective group)
            way()
        for run in range(args.runs):
            for name, way in ways.items():
                t0 = time.perf_counter()
                way()
                print(f"run {run + 1} {name:<12} {size / (time.perf_counter() - t0) / 1e9:.2f} GB/s", flush=True)
        assert ray.get(a.checksum.remote("data")) == ray.get(b.checksum.remote("arena")), "bytes differ"
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
