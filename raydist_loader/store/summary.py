"""Layer 2 (store): ``inspect``: what a store holds for a model, and with ``tp`` what each rank will move."""

from __future__ import annotations

from ..bulk import bulk
from ..connectors import open_connector
from .experts import check_ep, linear
from .manifest import Manifest
from .plan import RankPlan, make_plan, make_plans
from .versions import read_manifest


@bulk
def inspect(
    url: str, model: str, *, tp: int | None = None, connector_options: dict | None = None, ep: int | None = None,
    model_version: str | None = None,
) -> dict:
    """A JSON-able summary: version, layout, tensors (dtype, shape, style, chunks) and, with ``tp``, per-rank bytes
    (with ``ep`` too: each of ``ep`` expert-parallel ranks, holding its experts whole under vLLM's linear
    placement, its other tensors as TP rank ``r % tp``)."""
    with open_connector(url, **(connector_options or {})) as conn:
        manifest = read_manifest(conn, model, model_version)
        where = conn.describe()
        gap = conn.coalesce_gap
    return summarize(manifest, where, tp, gap, ep=ep)


@bulk
def summarize(
    manifest: Manifest, where: str, tp: int | None = None, coalesce_gap: int = 1 << 20, *, ep: int | None = None
) -> dict:
    out = {
        "store": where,
        "model": manifest.model,
        "version": manifest.version,
        "layout": manifest.layout,
        "max_tp": manifest.max_tp,
        "served_tp": manifest.served_tps(),
        "bytes": manifest.total_bytes,
        "digests": manifest.digests,
        "rules": manifest.rules.get("name", "custom"),
        "tensors": [
            {
                "name": n,
                "dtype": t.dtype,
                "shape": t.shape,
                "style": manifest.rule_of(t).style,
                "dim": manifest.rule_of(t).dim,
                "chunks": len(manifest.grid_of(t)),
                "bytes": t.nbytes,
            }
            for n, t in manifest.tensors.items()
        ],
        "files": sorted(manifest.files),
    }
    if ep is not None:
        tp = tp or ep
        check_ep(ep, tp)
        names = list(manifest.tensors)
        out["tp"], out["ep"] = tp, ep
        out["ranks"] = [
            {**_rank_row(make_plan(manifest, tp, r % tp, coalesce_gap=coalesce_gap, experts=linear(names, ep, r))),
             "rank": r}
            for r in range(ep)
        ]
    elif tp is not None:
        out["tp"] = tp
        out["ranks"] = [_rank_row(plan) for plan in make_plans(manifest, tp, coalesce_gap=coalesce_gap)]
    return out


def _rank_row(plan: RankPlan) -> dict:
    split = sum(s.nbytes for s in plan.tensors if s.dim is not None)
    replicated = sum(s.nbytes for s in plan.tensors if s.dim is None)
    return {
        "rank": plan.rank,
        "bytes": plan.bytes_kept,
        "bytes_read": plan.bytes_read,
        "split_bytes": split,
        "replicated_bytes": replicated,
        "reads": len(plan.reads),
        "digest": plan.expected_digest,
    }


def render(summary: dict, max_rows: int = 40) -> str:
    """Human-readable text of :func:`inspect`'s summary."""
    s = summary
    version = f" version {s['version']}" if s.get("version") else ""
    lines = [
        f"model {s['model']}{version} ({s['layout']}) in {s['store']}",
        f"  {len(s['tensors'])} tensors, {human_bytes(s['bytes'])}, max_tp {s['max_tp']}, serves tp {s['served_tp']}, "
        + (f"digests {', '.join(s['digests'])}, " if s["digests"] else "")
        + f"rules {s['rules']}"
        + (f", quantization {s['quantization']}" if s.get("quantization") else ""),
        *([] if s["layout"] == "config-only" else [f"  files: {', '.join(s['files']) or '-'}"]),
        f"  {'tensor':<56} {'dtype':<9} {'shape':<18} {'style':<9} {'dim':>3} {'chunks':>6}",
    ]
    for t in s["tensors"][:max_rows]:
        lines.append(
            f"  {t['name']:<56} {t['dtype']:<9} {str(t['shape']):<18} {t['style']:<9} "
            f"{'-' if t['dim'] is None else t['dim']:>3} {t['chunks']:>6}"
        )
    if len(s["tensors"]) > max_rows:
        lines.append(f"  ... {len(s['tensors']) - max_rows} more (use --json for all)")
    if "ranks" in s:
        at = f"tp={s['tp']}" + (f", ep={s['ep']}" if s.get("ep") else "")
        lines.append(f"  at {at}: {'rank':>4} {'moves':>12} {'split':>12} {'replicated':>12} {'reads':>6}")
        for r in s["ranks"]:
            lines.append(
                f"  {'':>8} {r['rank']:>4} {human_bytes(r['bytes']):>12} {human_bytes(r['split_bytes']):>12} "
                f"{human_bytes(r['replicated_bytes']):>12} {r['reads']:>6}"
            )
    lines += [f"  note: {n}" for n in s.get("notes", [])]
    if s.get("refused"):
        lines.append(f"  refused: {s['refused']}")
    return "\n".join(lines)


def human_bytes(n: int) -> str:
    """``1234567`` -> ``1.23 MB`` (decimal units, as the GB/s figures)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
