"""Held actors reached from another driver and released; Ctrl-C and SIGKILL of a loading driver leave nothing behind.

One persistent Ray cluster for the module (``ray start --head --block`` in its own process group, a temp dir and
free ports of its own, the dashboard on for Ray's state API); every driver is a separate process that joins it by
address: ``raydist-loader load`` (the CLI) and small Python sessions. Slow loads read through the ``faulty+file``
connector (registered the way a plug-in is: an entry point on the PYTHONPATH that the cluster's workers inherit),
so an interrupt lands in the middle of the pull.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import ray
import torch
from ray.util.placement_group import placement_group_table
from safetensors.torch import load_file

import raydist_loader as rl
from raydist_loader.connectors import ENTRY_POINT_GROUP
from raydist_loader.driver.cluster import _TOKEN, connect
from raydist_loader.driver.held import held_names
from raydist_loader.testing.tiny_models import make_tiny_checkpoint

from .conftest import free_port, wait_for_port
from .shards import assert_shards_match, original_tensors

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
# one chunk-read call per 4 KiB, one at a time, 300 ms each: a rank's pull of the tiny llama takes tens of seconds
SLOW = "delay_ms=300&request_bytes=4096&concurrency=1"


@dataclass
class Cluster:
    address: str
    env: dict[str, str]  # for every driver process: the faulty+ plug-in on PYTHONPATH, Ray auth as the cluster has it
    root: Path


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    root = Path(tempfile.mkdtemp(prefix="rdl-", dir="/tmp"))  # short: Ray's socket paths live under it
    plugin = root / "plugin" / "raydist_faulty-1.0.dist-info"
    plugin.mkdir(parents=True)
    (plugin / "METADATA").write_text("Metadata-Version: 2.1\nName: raydist-faulty\nVersion: 1.0\n")
    (plugin / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\nfaulty+file = raydist_loader.testing.faulty:FaultyConnector\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(plugin.parent), os.environ.get("PYTHONPATH")])))
    if _TOKEN.exists():
        env.setdefault("RAY_AUTH_MODE", "token")  # `ray start` enables token auth when the token exists
    port, client, dash, agent, metrics, runtime = (free_port() for _ in range(6))
    head = subprocess.Popen(
        [sys.executable, "-c", "from ray.scripts.scripts import main; main()", "start", "--head", "--block",
         "--temp-dir", str(root / "ray"), "--port", str(port), "--ray-client-server-port", str(client),
         "--dashboard-port", str(dash), "--dashboard-agent-listen-port", str(agent), "--metrics-export-port",
         str(metrics), "--runtime-env-agent-port", str(runtime), "--num-cpus", "2", "--num-gpus", "0",
         "--include-dashboard", "true", "--disable-usage-stats"],
        env=env, cwd=root, stdout=open(root / "ray-start.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
        start_new_session=True,  # its own process group: the teardown ends exactly this cluster
    )
    try:
        wait_for_port("127.0.0.1", port, timeout=60)
        address = f"127.0.0.1:{port}"
        connect(address)  # this test process is a driver too: it checks the cluster's state
        _wait_until(lambda: ray.cluster_resources().get("CPU") == 2, 60, "the head node to register")
        yield Cluster(address, env, root)
    finally:
        ray.shutdown()
        for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            _wait_until(lambda: _group_gone(head.pid), grace, "the cluster to stop", fail=False)
        head.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def store(cluster: Cluster):
    ckpt = make_tiny_checkpoint("llama", cluster.root / "llama", dtype=torch.bfloat16)
    url = f"file://{cluster.root}/store"
    rl.publish(ckpt, url, "m", max_tp=2)
    return url, f"faulty+{url}?{SLOW}", original_tensors(ckpt)


# ------------------------------------------------------------------------------------------ helpers
def _wait_until(cond, timeout: float, what: str, *, step: float = 0.1, fail: bool = True) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            if fail:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            return False
        time.sleep(step)
    return True


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


@dataclass
class _Driver:
    """A driver process (the CLI or a Python session) with its output collected line by line as it comes."""

    proc: subprocess.Popen
    out: list[str] = field(default_factory=list)
    err: list[str] = field(default_factory=list)
    err_at: list[float] = field(default_factory=list)  # when each stderr line came (time.monotonic)

    def __post_init__(self) -> None:
        self._readers = [threading.Thread(target=self._read, args=(s, to), daemon=True)
                         for s, to in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._readers:
            t.start()

    def _read(self, stream, into: list[str]) -> None:
        for line in stream:
            if into is self.err:
                self.err_at.append(time.monotonic())
            into.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float) -> None:
        _wait_until(lambda: any(text in line for line in self.err + self.out) or self.proc.poll() is not None,
                    timeout, repr(text))
        assert any(text in line for line in self.err + self.out), (self.out, self.err)

    def finish(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout=timeout)
        for t in self._readers:
            t.join(10)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.finish()


def _cli(cluster: Cluster, *argv: str) -> _Driver:
    return _python(cluster, "-m", "raydist_loader", *argv)


def _python(cluster: Cluster, *argv: str) -> _Driver:
    proc = subprocess.Popen([sys.executable, *argv], env=cluster.env, cwd=cluster.root, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return _Driver(proc)


def _load(cluster: Cluster, url: str, *extra: str) -> _Driver:
    return _cli(cluster, "load", url, "--model", "m", "--tp", "2", "--ray-address", cluster.address,
                "--no-progress", *extra)


def _live_loaders() -> list:
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address  # never "auto": other Ray clusters may run on this machine
    actors = list_actors(address=address, filters=[("class_name", "=", "ShardLoader")], limit=1000)
    return [a for a in actors if a.state != "DEAD"]


def _live_groups() -> list[dict]:
    return [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"]


def _nothing_left() -> bool:
    return not _live_loaders() and not _live_groups()


def _mid_pull(rank: int = 0) -> bool:
    """Whether held rank ``rank`` has landed some but not all of its bytes."""
    try:
        got, total = ray.get(ray.get_actor(f"raydist:m:{rank}", namespace="raydist").progress.remote(), timeout=5)
    except Exception:  # noqa: BLE001 - not started yet
        return False
    return 0 < got < total


def _interrupt(driver: _Driver) -> tuple[int, float, float]:
    """SIGINT the driver; its exit code, and seconds from the signal to its last stderr line and to its exit."""
    t0 = time.monotonic()
    driver.proc.send_signal(signal.SIGINT)
    code = driver.finish(timeout=60)
    return code, (driver.err_at or [t0])[-1] - t0, time.monotonic() - t0


# ------------------------------------------------------------------------------------------ held actors
READER = textwrap.dedent('''
    import json, sys
    import ray
    from safetensors.torch import save_file

    ray.init(address=sys.argv[1], log_to_driver=False)  # another driver, in its own (anonymous) namespace
    out = {}
    for rank in (0, 1):
        actor = ray.get_actor(f"raydist:m:{rank}", namespace="raydist")
        tensors = ray.get(actor.state_dict.remote())
        save_file({k: v.contiguous() for k, v in tensors.items()}, f"{sys.argv[2]}/rank{rank}.safetensors")
        out[rank] = {"metadata": ray.get(actor.metadata.remote()),
                     "run": ray.get(actor.run.remote(lambda r, t, x: [r, len(t), x], "hello"))}
    print(json.dumps(out))
''')


def test_held_actors_are_reached_by_name_from_another_driver_and_released(cluster, store, tmp_path):
    url, _, original = store
    holder = _load(cluster, url, "--hold")
    try:
        holder.wait_for("raydist-loader: release: Ctrl-C here", 120)
        assert "raydist-loader: holding raydist:m:0, raydist:m:1 in Ray namespace 'raydist'" in holder.err[0]
        assert held_names("m") == ["raydist:m:0", "raydist:m:1"]

        reader = _python(cluster, "-c", READER, cluster.address, str(tmp_path))
        assert reader.finish(120) == 0, reader.err
        got = json.loads(reader.out[-1])
        shards = [(load_file(tmp_path / f"rank{r}.safetensors"), got[str(r)]["metadata"]) for r in (0, 1)]
        assert_shards_match(original, shards)
        assert [got[str(r)]["run"] for r in (0, 1)] == [[0, len(original), "hello"], [1, len(original), "hello"]]

        second = _load(cluster, url, "--hold")
        assert second.finish(120) == 2
        assert len(second.err) == 1 and second.out == [], second.err
        assert "model 'm' is already held by live actors raydist:m:0, raydist:m:1 in Ray namespace 'raydist'" in (
            second.err[0])
        assert "raydist-loader release --model m" in second.err[0]
        assert held_names("m") == ["raydist:m:0", "raydist:m:1"], "the refused hold touched nothing"

        release = _cli(cluster, "release", "--model", "m", "--ray-address", cluster.address)
        assert release.finish(120) == 0, release.err
        assert release.out == ["released m: actors raydist:m:0, raydist:m:1 (Ray namespace 'raydist') and "
                               "placement group 'raydist:m'"]
        assert holder.finish(30) == 0, "the holder ends once its actors are released"
        assert holder.err[-1] == "raydist-loader: released (the actors were ended elsewhere: `release`, or a failure)"
        _wait_until(_nothing_left, 30, "no actor and no placement group left")
    finally:
        holder.kill()

    again = _cli(cluster, "release", "--model", "m", "--ray-address", cluster.address)
    assert again.finish(120) == 2
    assert again.err == ["raydist-loader: error: nothing holds model 'm' in Ray namespace 'raydist' on this "
                         "cluster; no model is held"]


# ------------------------------------------------------------------------------------------ Ctrl-C
def _assert_interrupted(driver: _Driver) -> str:
    code, line_s, seconds = _interrupt(driver)
    assert code == 130, (driver.out, driver.err)
    assert driver.err == ["raydist-loader: interrupted"] and driver.out == [], (driver.out, driver.err)
    assert seconds < 20, f"the load went on for {seconds:.1f}s after Ctrl-C"  # uninterrupted it takes minutes
    _wait_until(_nothing_left, 15, "no actor and no placement group left")
    return f"Ctrl-C -> line {line_s:.2f}s, exit {seconds:.2f}s"


def test_ctrl_c_during_start_up_and_mid_pull_stops_the_load(cluster, store):
    _, slow, _ = store
    # start-up: the placement group exists, the actors are starting (importing torch, opening the store)
    driver = _load(cluster, slow)
    _wait_until(lambda: _live_groups() or driver.proc.poll() is not None, 120, "the placement group", step=0.02)
    print(_assert_interrupted(driver))
    # mid-pull (a held load, so that the test can ask a rank how far it is; it is not holding yet)
    driver = _load(cluster, slow, "--hold")
    _wait_until(lambda: _mid_pull() or driver.proc.poll() is not None, 120, "rank 0 to be mid-pull", step=0.05)
    print(_assert_interrupted(driver))


SESSION = textwrap.dedent('''
    import json, os, signal, sys, threading, time
    import ray
    import raydist_loader as rl
    from ray.util.placement_group import placement_group_table
    from ray.util.state import list_actors

    ray.init(address=sys.argv[1], log_to_driver=False)
    sent = {}

    def ctrl_c_mid_pull():
        actor = None
        while True:
            try:
                actor = actor or ray.get_actor("raydist:m:1", namespace="raydist")
                got, total = ray.get(actor.progress.remote(), timeout=5)
                if 0 < got < total:
                    break
            except Exception:
                pass
            time.sleep(0.05)
        sent["at"] = time.monotonic()
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=ctrl_c_mid_pull, daemon=True).start()
    try:
        rl.load_across_cluster("m", sys.argv[2], tp=2, hold=True, progress=False)
        result = {"interrupted": False}
    except KeyboardInterrupt:
        result = {"interrupted": True, "seconds": time.monotonic() - sent["at"]}
    deadline = time.monotonic() + 15  # the session goes on: nothing may be left running for it
    while time.monotonic() < deadline:
        found = list_actors(address=sys.argv[1], filters=[("class_name", "=", "ShardLoader")], limit=1000)
        actors = [a.state for a in found if a.state != "DEAD"]
        groups = [g["state"] for g in placement_group_table().values() if g["state"] != "REMOVED"]
        if not actors and not groups:
            break
        time.sleep(0.1)
    result.update(actors=actors, groups=groups, connected=ray.is_initialized())
    print(json.dumps(result))
''')


def test_ctrl_c_in_a_python_session_reaches_the_caller_and_leaves_nothing_running(cluster, store):
    _, slow, _ = store
    session = _python(cluster, "-c", SESSION, cluster.address, slow)
    assert session.finish(180) == 0, session.err
    result = json.loads(session.out[-1])
    assert result["interrupted"], "KeyboardInterrupt must reach the caller"
    assert result["actors"] == [] and result["groups"] == [], result
    assert result["connected"] and result["seconds"] < 20, result
    print(f"ctrl-c -> KeyboardInterrupt in the session {result['seconds']:.2f}s")


# ------------------------------------------------------------------------------------------ SIGKILL
def test_a_killed_driver_leaves_no_actor_holding_memory(cluster, store):
    url, slow, _ = store
    # mid-load: both actors alive and pulling
    driver = _load(cluster, slow)
    _wait_until(lambda: len([a for a in _live_loaders() if a.state == "ALIVE"]) == 2 or driver.proc.poll()
                is not None, 120, "both actors alive")
    time.sleep(1.0)
    assert driver.proc.poll() is None, (driver.out, driver.err)
    driver.kill()  # SIGKILL: no clean-up of its own
    _wait_until(_nothing_left, 30, "the dead driver's actors and placement group to go")
    # held: the actors are owned by the holder, not detached, so they end with it too
    holder = _load(cluster, url, "--hold")
    holder.wait_for("raydist-loader: release: Ctrl-C here", 120)
    assert held_names("m") == ["raydist:m:0", "raydist:m:1"]
    holder.kill()
    _wait_until(lambda: not held_names("m") and _nothing_left(), 30, "the held actors to end with their holder")
