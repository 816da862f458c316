"""Summaries, the printed tables, latest.json's content and the charts (matplotlib, Agg backend)."""

from __future__ import annotations

import statistics
from pathlib import Path

MIB = 1 << 20
RSS_ALLOWANCE = 256 * MIB
OURS = "ours tp=1"

# (backend, peer way, minimum ratio ours / peer) -- issue 4's table
PEER_TARGETS = [
    ("redis", "RESP ceiling", 0.9),
    ("redis", "SGLang GET per tensor", 2.0),
    ("s3", "boto3 8x16MiB ranges", 1.0),
    ("s3", "Run:ai streamer", 1.7),
    ("file", "page-cache readinto", 0.9),
    ("file", "Run:ai streamer", 2.0),
]


def _med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarise(samples: dict, idle: list[int], backends: list[str]) -> dict:
    ways: dict = {}
    for backend in backends:
        for name, runs in samples[backend].items():
            entry = {
                "backend": backend,
                "way": name,
                "gbps": _med([s["gbps"] for s in runs]),
                "gbps_runs": [round(s["gbps"], 4) for s in runs],
                "seconds": _med([s["seconds"] for s in runs]),
                "bytes": runs[0]["bytes"],
            }
            for key in ("time_to_ready_s", "first_read_s", "start_skew_s"):
                if key in runs[0]:
                    entry[key] = _med([s[key] for s in runs])
            ways[f"{backend}/{name}"] = entry
    idle_rss = _med(idle)
    targets = []

    def add(backend, way, what, value, limit, op, detail=""):
        met = value >= limit if op == ">=" else value <= limit
        targets.append(
            {
                "backend": backend,
                "way": way,
                "what": what,
                "value": value,
                "target": f"{op} {limit:g}",
                "met": bool(met),
                "detail": detail,
            }
        )

    for backend, peer, limit in PEER_TARGETS:
        if backend not in backends:
            continue
        for mine in (OURS, "ours load_shard"):
            a, b = ways[f"{backend}/{mine}"], ways[f"{backend}/{peer}"]
            pairs = zip(samples[backend][mine], samples[backend][peer], strict=True)
            paired = [x["gbps"] / y["gbps"] for x, y in pairs]
            add(
                backend,
                mine,
                f"x {peer}",
                a["gbps"] / b["gbps"],
                limit,
                ">=",
                f"{a['gbps']:.2f} vs {b['gbps']:.2f} GB/s; paired-run ratios {min(paired):.2f}-{max(paired):.2f}",
            )
    for backend in backends:
        one, two = ways[f"{backend}/{OURS}"], ways[f"{backend}/ours tp=2"]
        add(
            backend,
            "ours tp=2",
            "aggregate x tp=1",
            two["gbps"] / one["gbps"],
            0.9,
            ">=",
            f"{two['gbps']:.2f} vs {one['gbps']:.2f} GB/s",
        )
        for way in (OURS, "ours tp=2"):
            ranks = [r for s in samples[backend][way] for r in s["ranks"]]
            moved = max(r["bytes_read"] / r["bytes"] for r in ranks if r["bytes"])
            add(
                backend,
                way,
                "bytes moved / shard (worst rank)",
                moved,
                1.02,
                "<=",
                f"shard {max(r['bytes'] for r in ranks) / MIB:.0f} MiB per rank",
            )
            growth = [r["peak_rss"] - idle_rss - r["bytes"] for r in ranks]
            worst = max(growth)
            add(
                backend,
                way,
                "peak RSS growth - shard (MiB, worst rank)",
                worst / MIB,
                RSS_ALLOWANCE / MIB,
                "<=",
                f"idle actor {idle_rss / MIB:.0f} MiB; above shard {min(growth) / MIB:.0f}-{worst / MIB:.0f} MiB",
            )
        with_v = _med([s["seconds"] for s in samples[backend][OURS]])
        without = _med([s["seconds"] for s in samples[backend]["ours tp=1 no-verify"]])
        add(
            backend,
            OURS,
            "digest cost (% of load time)",
            100 * (with_v - without) / with_v,
            5.0,
            "<=",
            f"{with_v:.3f}s verified vs {without:.3f}s not",
        )
    timeline = {}
    for backend in backends:
        last = samples[backend]["ours tp=2"][-1]
        timeline[backend] = {k: last[k] for k in ("t_call", "time_to_ready_s", "ranks")}
    return {"ways": ways, "targets": targets, "idle_actor_peak_rss": idle_rss, "idle_runs": idle, "timeline": timeline}


def render(result: dict) -> str:
    lines = ["", "## All ways (median GB/s over the runs; ours = load window, time-to-ready apart)", ""]
    lines.append("| backend | way | GB/s | runs (GB/s) | median s | time-to-ready s | first read s | rank skew s |")
    lines.append("|---|---|---:|---|---:|---:|---:|---:|")
    for w in result["ways"].values():
        extra = " | ".join(f"{w[k]:.2f}" if k in w else "" for k in ("time_to_ready_s", "first_read_s", "start_skew_s"))
        runs = " ".join(f"{g:.2f}" for g in w["gbps_runs"])
        lines.append(f"| {w['backend']} | {w['way']} | {w['gbps']:.2f} | {runs} | {w['seconds']:.3f} | {extra} |")
    lines += ["", "## Targets (issue 4)", ""]
    lines.append("| backend | way | measure | value | target | met? | detail |")
    lines.append("|---|---|---|---:|---|---|---|")
    for t in result["targets"]:
        lines.append(
            f"| {t['backend']} | {t['way']} | {t['what']} | {t['value']:.2f} | {t['target']} | "
            f"{'yes' if t['met'] else '**NO**'} | {t['detail']} |"
        )
    return "\n".join(lines) + "\n"


def charts(result: dict, samples: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = list(samples)
    fig, axes = plt.subplots(1, len(backends), figsize=(5.5 * len(backends), 4.8), squeeze=False)
    for ax, backend in zip(axes[0], backends, strict=True):
        names = list(samples[backend])
        meds = [result["ways"][f"{backend}/{n}"]["gbps"] for n in names]
        lo = [m - min(s["gbps"] for s in samples[backend][n]) for m, n in zip(meds, names, strict=True)]
        hi = [max(s["gbps"] for s in samples[backend][n]) - m for m, n in zip(meds, names, strict=True)]
        colors = ["tab:blue" if n.startswith("ours") else "tab:gray" for n in names]
        bars = ax.bar(range(len(names)), meds, yerr=[lo, hi], color=colors, capsize=3)
        for bar, n in zip(bars, names, strict=True):
            if any(k in n for k in ("ceiling", "readinto", "boto3", "first-touch")):
                bar.set_hatch("//")
        for i, m in enumerate(meds):
            ax.text(i, m, f"{m:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(backend)
        ax.set_ylabel("GB/s (median, min-max bars)")
    fig.suptitle("raydist_loader (blue) vs peers (grey; hatched = ceiling / reference way), same data, one run")
    fig.tight_layout()
    fig.savefig(out / "latest.png", dpi=110)
    plt.close(fig)

    tl = result["timeline"]
    fig, axes = plt.subplots(len(tl), 1, figsize=(9, 1.6 + 1.3 * len(tl)), squeeze=False)
    for ax, (backend, load) in zip(axes[:, 0], tl.items(), strict=True):
        t0 = load["t_call"]
        for r in load["ranks"]:
            y = r["rank"]
            ax.barh(y, r["started"] - t0, left=0, color="lightgray")
            ax.barh(y, r["finished"] - r["started"], left=r["started"] - t0, color="tab:blue")
            ax.text(r["finished"] - t0, y, f" {r['bytes'] / r['seconds'] / 1e9:.2f} GB/s", va="center", fontsize=8)
        ax.axvline(load["time_to_ready_s"], color="tab:red", lw=1, ls="--")
        ax.set_yticks([r["rank"] for r in load["ranks"]], [f"rank {r['rank']}" for r in load["ranks"]])
        ax.set_title(
            f"{backend}: tp=2 load (grey: call -> first read; blue: read+hash+place; red: actors placed)", fontsize=9
        )
        ax.set_xlabel("seconds since load_across_cluster() was called")
    fig.tight_layout()
    fig.savefig(out / "timeline.png", dpi=110)
    plt.close(fig)
