"""Summaries, the printed tables, latest.json's content and the charts (matplotlib, Agg backend)."""

from __future__ import annotations

import statistics
from pathlib import Path

MIB = 1 << 20
RSS_ALLOWANCE = 256 * MIB
OURS = "ours tp=1"

PUBLISH, READY = "publish", "ready"  # bench.py's groups of ways beside the backends
PHASES = ("manifest", "connect", "placement", "actors", "pull", "verify")  # raydist_loader.report.PHASES
# (group, way, way it is compared with, minimum ratio of GB/s, a like-for-like reference also shown or None)
# -- issue 14's throughput targets
RATIO_TARGETS = [
    ("file", "ours load_shard", OURS, 0.9, None),
    ("redis", "ours load_shard", OURS, 0.9, None),
    ("s3", "ours load_shard", OURS, 0.9, None),
    ("s3", "ours load_shard", "boto3 8x16MiB ranges", 1.0, "boto3 8x16MiB, fresh buffer"),
    (PUBLISH, "redis: ours publish", ("redis", OURS), 0.8, None),
    (PUBLISH, "s3: ours publish", "s3: boto3 upload_file 8 threads", 0.9, None),
    (PUBLISH, "file: ours publish", "file: cp", 0.8, "file: cp + sync"),
]
# (way, most seconds from the call to a verified model) -- issue 14's time-to-ready targets (demo model, tp=2)
READY_TARGETS = [("join a running cluster", 4.0), ("private local Ray", 10.0)]

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


def _paired(mine: list[dict], other: list[dict]) -> list[float]:
    """Per-run ratios of GB/s (ours and the other way ran in the same run)."""
    return [x["gbps"] / y["gbps"] for x, y in zip(mine, other, strict=True)]


def summarise(samples: dict, idle: list[int], backends: list[str]) -> dict:
    ways: dict = {}
    for backend in samples:
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
            if "phases" in runs[0]:  # time to ready: median start and end of each phase
                entry["phases"] = {
                    p: [_med([s["phases"][p][0] for s in runs]), _med([s["phases"][p][1] for s in runs])]
                    for p in PHASES if p in runs[0]["phases"]
                }
            ways[f"{backend}/{name}"] = entry
    idle_rss = _med(idle)
    targets = []

    def add(backend, way, what, value, limit, op, detail="", issue=4):
        met = value >= limit if op == ">=" else value <= limit
        targets.append(
            {
                "issue": issue,
                "backend": backend,
                "way": way,
                "what": what,
                "value": value,
                "target": f"{op} {limit:g}",
                "met": bool(met),
                "detail": detail,
            }
        )

    def ratio(group, mine, other, limit, issue):
        other_group, other_way = other if isinstance(other, tuple) else (group, other)
        a, b = ways[f"{group}/{mine}"], ways[f"{other_group}/{other_way}"]
        paired = _paired(samples[group][mine], samples[other_group][other_way])
        label = other_way if other_group == group else f"{other_group} {other_way}"
        detail = (f"median GB/s {a['gbps']:.2f} vs {b['gbps']:.2f} ({a['gbps'] / b['gbps']:.2f}x); per-run ratios "
                  + " ".join(f"{r:.2f}" for r in paired))
        if "fixed_s" in samples[group][mine][0]:
            fixed = _med([x["fixed_s"] for x in samples[group][mine]])
            detail += f"; fixed costs (store opened, manifest, plan) {fixed:.3f} of {a['seconds']:.3f} s"
        add(group, mine, f"x {label}", _med(paired), limit, ">=", detail, issue)  # ratios in the same run

    for backend, peer, limit in PEER_TARGETS:
        if backend in backends:
            ratio(backend, OURS, peer, limit, 4)
    for group, mine, other, limit, reference in RATIO_TARGETS:
        other_key = "/".join(other) if isinstance(other, tuple) else f"{group}/{other}"
        if f"{group}/{mine}" in ways and other_key in ways:
            ratio(group, mine, other, limit, 14)
            if reference and f"{group}/{reference}" in ways:
                like = _med(_paired(samples[group][mine], samples[group][reference]))
                targets[-1]["detail"] += f"; x {reference} (like for like) {like:.2f}"
    for way, limit in READY_TARGETS:
        if f"{READY}/{way}" in ways:
            w = ways[f"{READY}/{way}"]
            phases = ", ".join(f"{p} {b - a:.2f}" for p, (a, b) in w["phases"].items())
            runs = " ".join(f"{x['seconds']:.2f}" for x in samples[READY][way])
            add(READY, way, "demo model tp=2: call -> verified (s)", w["seconds"], limit, "<=",
                f"runs {runs}; median phases (s): {phases}", 14)
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
    for w in (w for w in result["ways"].values() if w["backend"] != READY):  # READY: the next table
        extra = " | ".join(f"{w[k]:.2f}" if k in w else "" for k in ("time_to_ready_s", "first_read_s", "start_skew_s"))
        runs = " ".join(f"{g:.2f}" for g in w["gbps_runs"])
        lines.append(f"| {w['backend']} | {w['way']} | {w['gbps']:.2f} | {runs} | {w['seconds']:.3f} | {extra} |")
    lines += ["", "## Time to ready (median seconds since the call; the expected digests are computed while Ray "
              "connects)", ""]
    lines.append("| group | way | call -> verified | " + " | ".join(PHASES) + " |")
    lines.append("|---|---|---:|" + "---:|" * len(PHASES))
    for w in result["ways"].values():
        if "phases" in w:
            cells = " | ".join(f"{w['phases'][p][1] - w['phases'][p][0]:.2f}" if p in w["phases"] else ""
                               for p in PHASES)
            total = w["seconds"] if w["backend"] == READY else max(b for _, b in w["phases"].values())
            lines.append(f"| {w['backend']} | {w['way']} | {total:.2f} | {cells} |")
    for issue in sorted({t["issue"] for t in result["targets"]}):
        lines += ["", f"## Targets (issue {issue})", ""]
        lines.append("| group | way | measure | value | target | met? | detail |")
        lines.append("|---|---|---|---:|---|---|---|")
        for t in (t for t in result["targets"] if t["issue"] == issue):
            lines.append(
                f"| {t['backend']} | {t['way']} | {t['what']} | {t['value']:.2f} | {t['target']} | "
                f"{'yes' if t['met'] else '**NO**'} | {t['detail']} |"
            )
    return "\n".join(lines) + "\n"


def charts(result: dict, samples: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = [g for g in samples if g not in (PUBLISH, READY)]
    extra = [g for g in (PUBLISH, READY) if g in samples]  # a second row: publish, time to ready
    cols = max(len(backends), 2)
    fig = plt.figure(figsize=(5.5 * cols, 4.8 * (1 + bool(extra))))
    grid = fig.add_gridspec(1 + bool(extra), cols)
    axes = [fig.add_subplot(grid[0, i]) for i in range(len(backends))]
    if extra:
        half = cols // 2 if len(extra) == 2 else cols
        spans = [slice(0, half), slice(half, cols)][: len(extra)] if len(extra) == 2 else [slice(0, cols)]
        axes += [fig.add_subplot(grid[1, span]) for span in spans]
    for ax, backend in zip(axes, backends + extra, strict=True):
        if backend == READY:
            _ready_panel(ax, result, list(samples[READY]))
            continue
        names = list(samples[backend])
        meds = [result["ways"][f"{backend}/{n}"]["gbps"] for n in names]
        lo = [m - min(s["gbps"] for s in samples[backend][n]) for m, n in zip(meds, names, strict=True)]
        hi = [max(s["gbps"] for s in samples[backend][n]) - m for m, n in zip(meds, names, strict=True)]
        colors = ["tab:blue" if "ours" in n else "tab:gray" for n in names]
        bars = ax.bar(range(len(names)), meds, yerr=[lo, hi], color=colors, capsize=3)
        for bar, n in zip(bars, names, strict=True):
            if any(k in n for k in ("ceiling", "readinto", "boto3", "first-touch", "cp")):
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


PHASE_COLORS = dict(zip(PHASES, ("tab:purple", "tab:olive", "tab:cyan", "tab:orange", "tab:blue", "tab:green"),
                        strict=True))


def _ready_panel(ax, result: dict, names: list[str]) -> None:
    """The time-to-ready breakdown: each way's phases as spans (median start and end since the call)."""
    for y, name in enumerate(names):
        w = result["ways"][f"{READY}/{name}"]
        for phase, (a, b) in w["phases"].items():
            thin = phase == "manifest"  # overlaps connect (digests computed meanwhile): drawn thinner
            ax.barh(y, b - a, left=a, height=0.3 if thin else 0.6, color=PHASE_COLORS[phase],
                    label=phase if y == 0 else None)
        ax.text(w["seconds"], y, f" {w['seconds']:.1f} s", va="center", fontsize=8)
    for way, limit in READY_TARGETS:
        if way in names:
            ax.plot([limit, limit], [names.index(way) - 0.4, names.index(way) + 0.4], color="tab:red", lw=1.5)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("seconds since load_across_cluster() (median); red: target")
    ax.set_title("time to ready: demo model, tp=2")
    ax.legend(fontsize=7, loc="lower right")
