"""Versions (issue 26) on a directory, a real redis-server and moto's S3: every version keeps its own immutable
manifest, the current pointer is swapped by compare-and-swap; list, promote (rollback), pin, leases under gc,
stores written before versions existed."""

from __future__ import annotations

import json
import time

import pytest
import torch

import raydist_loader as rl
from raydist_loader.cli import main
from raydist_loader.connectors import open_connector
from raydist_loader.errors import NotFoundError, VerificationError
from raydist_loader.store.leases import Lease, read_leases
from raydist_loader.store.manifest import manifest_key
from raydist_loader.store.versions import POINTER_FORMAT, read_current, version_manifest_key

from .shards import original_tensors, single_manifest_layout

NORM = "model.norm.weight"


def _norm(url: str, **kw) -> torch.Tensor:
    return rl.load_shard("m", url, 2, 0, device="cpu", **kw).tensors[NORM]


def test_each_version_keeps_its_manifest_and_the_pointer_names_one(store_url, two_llamas):
    a = rl.publish(two_llamas[0], store_url, "m", max_tp=2).version
    b = rl.publish(two_llamas[1], store_url, "m", max_tp=2).version
    with open_connector(store_url) as conn:
        pointer = json.loads(conn.read(manifest_key("m")))
        assert pointer["format"] == POINTER_FORMAT and pointer["version"] == b and a in pointer["retired"]
        for v in (a, b):  # each version's own manifest, under its own prefix
            assert json.loads(conn.read(version_manifest_key("m", v)))["version"] == v
    listed = rl.versions(store_url, "m")
    assert [(v["version"], v["current"], v["complete"]) for v in listed] == [(b, True, True), (a, False, True)]
    assert listed[0]["kept"] == "current" and listed[1]["gc_after"] > time.time()
    assert listed[0]["bytes"] == listed[1]["bytes"] > 0 and listed[1]["published_at"] < listed[0]["published_at"]
    # pinned: the older version loads while the newer one is current, and the current one without a pin
    assert torch.equal(_norm(store_url, model_version=a), original_tensors(two_llamas[0])[NORM])
    assert torch.equal(_norm(store_url), original_tensors(two_llamas[1])[NORM])
    assert rl.load_shard("m", store_url, 2, 1, device="cpu", model_version=a).report.version == a


def test_promote_rolls_back_and_refuses_unknown_incomplete_and_gcd_versions(store_url, two_llamas):
    a = rl.publish(two_llamas[0], store_url, "m", max_tp=2).version
    b = rl.publish(two_llamas[1], store_url, "m", max_tp=2).version
    result = rl.promote(store_url, "m", a)
    assert (result.version, result.previous, result.changed) == (a, b, True)
    assert torch.equal(_norm(store_url), original_tensors(two_llamas[0])[NORM]), "the rollback serves a"
    assert not rl.promote(store_url, "m", a).changed
    assert [v["version"] for v in rl.versions(store_url, "m") if v["current"]] == [a]
    with pytest.raises(NotFoundError, match=r"version v20200101000000000-00000000 of model 'm' does not exist .*"
                                            r"`raydist-loader versions"):
        rl.promote(store_url, "m", "v20200101000000000-00000000")
    with pytest.raises(rl.ManifestError, match="expected a version id"):
        rl.promote(store_url, "m", "latest")
    # an object of b goes missing: b is listed incomplete and refused; a stays current
    with open_connector(store_url) as conn:
        victim = next(k for k in conn.list(f"m/{b}/") if not k.endswith("manifest.json"))
        conn.delete(victim)
    assert [v["complete"] for v in rl.versions(store_url, "m") if v["version"] == b] == [False]
    with pytest.raises(NotFoundError, match=rf"version {b} of 'm' is incomplete .* not promoted; version {a} stays"):
        rl.promote(store_url, "m", b)
    # promoted away, b is non-current like any other: past its grace gc deletes it, and then it is unknown
    assert rl.gc(store_url, "m", grace_s=0)["deleted"] == [f"m/{b}/"]
    with pytest.raises(NotFoundError, match="does not exist"):
        rl.promote(store_url, "m", b)
    assert rl.verify(store_url, "m").ok


def test_gc_keep_n_keeps_the_most_recently_current(tmp_path, two_llamas):
    url = f"file://{tmp_path}/store"
    versions = [rl.publish(two_llamas[i % 2], url, "m", max_tp=2).version for i in range(4)]
    rl.promote(url, "m", versions[0])  # current: v0; most recently current before it: v3, then v2, v1
    result = rl.gc(url, "m", grace_s=0, keep=2, dry_run=True)
    assert result["deleted"] == [f"m/{versions[1]}/"]
    assert "--keep 2" in result["reasons"][f"m/{versions[3]}/"] and result["reasons"][f"m/{versions[0]}/"] == "current"
    rl.gc(url, "m", grace_s=0, keep=2)
    assert [v["version"] for v in rl.versions(url, "m")] == sorted(set(versions) - {versions[1]}, reverse=True)


def test_a_leased_version_is_never_deleted_and_an_expired_lease_protects_nothing(store_url, two_llamas):
    a = rl.publish(two_llamas[0], store_url, "m", max_tp=2).version
    rl.publish(two_llamas[1], store_url, "m", max_tp=2)
    lease = Lease.take(store_url, "m", a, "test engine tp=2")
    try:
        result = rl.gc(store_url, "m", grace_s=0)
        assert result["deleted"] == [] and "leased: test engine tp=2 on" in result["reasons"][f"m/{a}/"]
        (listed,) = [v for v in rl.versions(store_url, "m") if v["version"] == a]
        assert [x["holder"] for x in listed["leases"]] == ["test engine tp=2"] and listed["leases"][0]["pid"] > 0
        lease.move(rl.versions(store_url, "m")[0]["version"])  # an update: the lease moves to the new version
        assert rl.gc(store_url, "m", grace_s=0, dry_run=True)["deleted"] == [f"m/{a}/"]
    finally:
        lease.release()
    with open_connector(store_url) as conn:
        assert read_leases(conn, "m") == {}, "a released lease is gone"
    with open_connector(store_url) as conn:  # what a holder that died leaves once its lease time has passed
        dead = {"holder": "crashed engine", "host": "h", "pid": 1, "started": 1.0, "renewed": 1.0, "expires": 2.0}
        conn.write(f"m/leases/{a}/h-1-dead.json", json.dumps(dead).encode())
        assert [x.live() for x in read_leases(conn, "m")[a]] == [False]
    assert rl.gc(store_url, "m", grace_s=0)["deleted"] == [f"m/{a}/"]
    with open_connector(store_url) as conn:
        assert read_leases(conn, "m") == {}, "gc tidies up leases long expired"
    with pytest.raises(rl.ConfigError, match=r"lease ttl: got 0.3; expected seconds in \[3"):
        Lease.take(store_url, "m", a, "too short", ttl_s=0.3)


def test_a_store_written_before_versions_loads_as_one_version_and_moves_on_at_the_next_publish(store_url,
                                                                                                 two_llamas):
    rl.publish(two_llamas[0], store_url, "m", max_tp=2)
    old = single_manifest_layout(store_url, "m")
    assert torch.equal(_norm(store_url), original_tensors(two_llamas[0])[NORM])
    assert torch.equal(_norm(store_url, model_version=old), original_tensors(two_llamas[0])[NORM])
    assert [(v["version"], v["current"], v["complete"]) for v in rl.versions(store_url, "m")] == [(old, True, True)]
    assert rl.verify(store_url, "m").ok
    new = rl.publish(two_llamas[1], store_url, "m", max_tp=2).version  # the next publish: pointer + both manifests
    with open_connector(store_url) as conn:
        assert read_current(conn, "m").legacy is None
        assert json.loads(conn.read(version_manifest_key("m", old)))["version"] == old
    assert [(v["version"], v["current"]) for v in rl.versions(store_url, "m")] == [(new, True), (old, False)]
    rl.promote(store_url, "m", old)
    assert torch.equal(_norm(store_url), original_tensors(two_llamas[0])[NORM])


def test_a_version_manifest_that_changed_is_refused(tmp_path, two_llamas):
    """A version's manifest never changes: the pointer's sha256 catches a replaced one (the engines' ranks check
    the sha256 their rank 0 resolved the same way)."""
    url = f"file://{tmp_path}/store"
    v = rl.publish(two_llamas[0], url, "m", max_tp=2).version
    path = tmp_path / "store" / "m" / v / "manifest.json"
    doc = json.loads(path.read_bytes())
    doc["config"]["note"] = "edited"
    path.write_text(json.dumps(doc))
    with pytest.raises(VerificationError, match=f"version {v} .* not .* as resolved: a version's manifest never"):
        _norm(url)


def test_cli_versions_json_promote_and_pins(tmp_path, two_llamas, capsys):
    url = f"file://{tmp_path}/store"
    a = rl.publish(two_llamas[0], url, "m", max_tp=2).version
    b = rl.publish(two_llamas[1], url, "m", max_tp=2).version
    assert main(["versions", url, "--model", "m", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(v["version"], v["current"]) for v in listed] == [(b, True), (a, False)]
    assert all(isinstance(v["published_at"], float) for v in listed)
    assert main(["versions", url, "--model", "m"]) == 0
    out = capsys.readouterr().out
    assert f"{b}  CURRENT" in out and f"{a}  complete" in out and "gc may delete it after" in out
    assert main(["promote", url, "--model", "m", a]) == 0
    assert f"version {a} is current (was {b})" in capsys.readouterr().out
    assert main(["promote", url, "--model", "m", "v20200101000000000-00000000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err and "raydist-loader versions" in err
    assert main(["verify", url, "--model", "m", "--model-version", b, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == b
    assert main(["inspect", url, "--model", "m", "--model-version", b, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == b
    assert main(["pull-files", url, "--model", "m", "--model-version", b, str(tmp_path / "cfg")]) == 0
    assert json.loads((tmp_path / "cfg" / "raydist.json").read_text())["model_version"] == b
    assert main(["load", url, "--model", "m", "--tp", "2", "--model-version", "latest"]) == 2
    assert "model_version" in capsys.readouterr().err


def test_a_damaged_pointer_is_one_clear_error_and_a_promote_or_publish_repairs_it(tmp_path, two_llamas):
    url = f"file://{tmp_path}/store"
    a = rl.publish(two_llamas[0], url, "m", max_tp=2).version
    pointer = tmp_path / "store" / "m" / "manifest.json"
    pointer.write_text(json.dumps({"format": POINTER_FORMAT, "version": a, "manifest_sha256": "00"}))
    with pytest.raises(rl.ManifestError, match=r"the current pointer is damaged: field manifest_sha256: .*promote"):
        _norm(url)
    assert rl.promote(url, "m", a).changed
    assert torch.equal(_norm(url), original_tensors(two_llamas[0])[NORM])
    pointer.write_text("{}")
    b = rl.publish(two_llamas[1], url, "m", max_tp=2).version
    assert torch.equal(_norm(url), original_tensors(two_llamas[1])[NORM])
    assert {v["version"] for v in rl.versions(url, "m")} == {a, b}


def test_gc_looks_again_just_before_it_deletes(tmp_path, two_llamas, monkeypatch):
    """A promote, or a load's lease, landing after gc surveyed the store but before it deletes: the version stays
    (gc re-reads the pointer and the version's leases per version, before and after its manifest goes)."""
    from raydist_loader.store import gc as gc_module

    url = f"file://{tmp_path}/store"
    a = rl.publish(two_llamas[0], url, "m", max_tp=2).version
    b = rl.publish(two_llamas[1], url, "m", max_tp=2).version
    survey = gc_module.survey

    def then_promote(conn, model, **kw):
        looked = survey(conn, model, **kw)
        rl.promote(url, "m", a)  # a rollback while gc runs
        return looked

    monkeypatch.setattr(gc_module, "survey", then_promote)
    result = rl.gc(url, "m", grace_s=0)
    assert result["deleted"] == [] and result["reasons"][f"m/{a}/"] == "became current while gc ran (a promote)"
    assert torch.equal(_norm(url), original_tensors(two_llamas[0])[NORM])

    def then_lease(conn, model, **kw):
        looked = survey(conn, model, **kw)
        Lease.take(url, "m", b, "engine that started late")
        return looked

    monkeypatch.setattr(gc_module, "survey", then_lease)
    result = rl.gc(url, "m", grace_s=0)
    assert result["deleted"] == [] and "leased: engine that started late" in result["reasons"][f"m/{b}/"]
    assert torch.equal(_norm(url, model_version=b), original_tensors(two_llamas[1])[NORM])


def test_gc_deletes_nothing_while_the_current_version_is_incomplete(tmp_path, two_llamas):
    url = f"file://{tmp_path}/store"
    a = rl.publish(two_llamas[0], url, "m", max_tp=2).version
    b = rl.publish(two_llamas[1], url, "m", max_tp=2).version
    (tmp_path / "store" / "m" / b / "manifest.json").unlink()
    listed = {v["version"]: v for v in rl.versions(url, "m")}
    assert listed[b]["current"] and not listed[b]["complete"] and "MISSING" in listed[b]["kept"]
    with pytest.raises(NotFoundError, match=rf"current version {b} .* incomplete .* gc deletes nothing"):
        rl.gc(url, "m", grace_s=0)
    rl.promote(url, "m", a)
    assert rl.gc(url, "m", grace_s=0)["deleted"] == [f"m/{b}/"]
