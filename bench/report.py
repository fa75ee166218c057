"""Turning runs into medians, ratios, goals, a Markdown report and a chart."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.load import TESTS, size_label

REFERENCES = ("redis", "twemproxy", "forwarder", "fc-before")
# fc-passthrough over the byte forwarder in docs/bench-latest.md's full run of
# 2026-12-07 18:38 UTC (3 rounds), before pooled mode: every client had its own upstream
# connection then, as fc-dedicated has now. "Dedicated no slower than before" compares
# fc-dedicated's ratio to the forwarder with these (test, pipeline, size).
BEFORE_POOLED_VS_FORWARDER: dict[tuple[str, int, int], float] = {
    ("SET", 1, 64): 0.78,
    ("GET", 1, 64): 0.66,
    ("SET", 16, 64): 0.79,
    ("GET", 16, 64): 0.68,
    ("SET", 1, 1024): 0.86,
    ("GET", 1, 1024): 0.68,
    ("SET", 16, 1024): 0.66,
    ("GET", 16, 1024): 0.82,
}
MiB = 1 << 20
HISTOGRAM_CEILING_MS = 3000.0  # redis-benchmark's latency histogram stops at 3 s

Row = dict[str, Any]


def median_or_none(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


Key = tuple[str, str, int, int]  # target, test, pipeline, size


def _index(runs: list[Row]) -> dict[tuple[str, str, int, int, int], float]:
    """requests/s of each good run, by (target, test, pipeline, size, round)."""
    return {
        (r["target"], r["test"], r["pipeline"], r["size"], r["round"]): r["rps"]
        for r in runs
        if r["error"] is None and r["rps"]
    }


def paired(runs: list[Row], a: Key, b: Key) -> list[float]:
    """rps(a) / rps(b) for each round that has both. The runs of one configuration are
    adjacent in time within a round, so these ratios cancel the machine's slow drift
    (other load) better than a ratio of medians would."""
    index = _index(runs)
    rounds = sorted({r["round"] for r in runs})
    out = []
    for number in rounds:
        x, y = index.get((*a, number)), index.get((*b, number))
        if x is not None and y:
            out.append(x / y)
    return out


def summarize(runs: list[Row], target_order: list[str]) -> list[Row]:
    """One row per (target, test, pipeline, size): medians over the rounds, and the median
    of the per-round ratios to each reference."""
    groups: dict[Key, list[Row]] = {}
    for run in runs:
        key = (run["target"], run["test"], run["pipeline"], run["size"])
        groups.setdefault(key, []).append(run)
    summary: list[Row] = []
    for (target, test, pipeline, size), group in groups.items():
        good = [r for r in group if r["error"] is None and r["rps"]]
        cpu = [
            r["cpu_s"] / r["requests"] * 100_000
            for r in good
            if r["cpu_s"] is not None and r["requests"]
        ]
        row: Row = {
            "target": target,
            "test": test,
            "pipeline": pipeline,
            "size": size,
            "rounds": len(good),
            "errors": [r["error"] for r in group if r["error"] is not None],
            "rps": median_or_none(r["rps"] for r in good),
            "p50_ms": median_or_none(r["p50_ms"] for r in good),
            "p99_ms": median_or_none(r["p99_ms"] for r in good),
            "cpu_s_per_100k": median_or_none(cpu),
            "redis_cpu_s_per_100k": median_or_none(
                r["redis_cpu_s"] / r["requests"] * 100_000 for r in good
            ),
        }
        for ref in REFERENCES:
            ratios = paired(runs, (target, test, pipeline, size), (ref, test, pipeline, size))
            row[f"x_{ref}"] = median_or_none(ratios)
            row[f"x_{ref}_rounds"] = [round(x, 3) for x in ratios]
        summary.append(row)
    order = {name: i for i, name in enumerate(target_order)}
    tests = list(TESTS)
    summary.sort(
        key=lambda r: (
            r["size"],
            r["pipeline"],
            tests.index(r["test"]),
            order.get(r["target"], 99),
        )
    )
    return summary


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def find(summary: list[Row], target: str, test: str, pipeline: int, size: int) -> Row | None:
    for row in summary:
        if (row["target"], row["test"], row["pipeline"], row["size"]) == (
            target,
            test,
            pipeline,
            size,
        ):
            return row
    return None


def goals(
    runs: list[Row],
    sizes: list[int],
    memory: dict[str, Any],
    connections: dict[str, Any] | None = None,
) -> list[Row]:
    """The targets fieldcrypt aims for, each met / missed / not run, with the measured
    ratio: the median of the per-round ratios (each round's range is in `rounds`)."""
    out: list[Row] = []

    def compare(name: str, a: Key, b: Key, threshold: float) -> None:
        ratios = paired(runs, a, b)
        value = median_or_none(ratios)
        status = "not run" if value is None else ("met" if value >= threshold else "missed")
        why = ""
        if value is None:
            missing = {a[0], b[0]} - {r["target"] for r in runs if r["error"] is None}
            why = f"no results for {', '.join(sorted(missing)) or 'both in one round'}"
        out.append(
            {
                "goal": name,
                "threshold": threshold,
                "measured": value,
                "rounds": [round(x, 3) for x in ratios],
                "status": status,
                "why": why,
            }
        )

    # The pooled-mode issue's targets (fc-passthrough is pooled, pool size 4, 50 clients)
    for size in sizes:
        label = size_label(size)
        for test in ("SET", "GET"):
            mine = ("fc-passthrough", test, 1, size)
            compare(
                f"pipeline 1 pooled passthrough {test} {label} >= 1.0x byte forwarder",
                mine,
                ("forwarder", test, 1, size),
                1.0,
            )
            compare(
                f"pipeline 1 pooled passthrough {test} {label} >= 0.7x twemproxy",
                mine,
                ("twemproxy", test, 1, size),
                0.7,
            )
            compare(
                f"pipeline 16 pooled passthrough {test} {label} >= 1.3x twemproxy",
                ("fc-passthrough", test, 16, size),
                ("twemproxy", test, 16, size),
                1.3,
            )
    out.append(_connections_goal(connections or {}))
    before_ran = any(r["target"] == "fc-before" and r["error"] is None for r in runs)
    for size in sizes:
        for pipeline in (1, 16):
            for test in ("SET", "GET"):
                if before_ran:  # the same run: the better comparison
                    compare(
                        f"dedicated P{pipeline} {test} {size_label(size)} no slower than "
                        "before: >= 1.0x fc-before (same run)",
                        ("fc-dedicated", test, pipeline, size),
                        ("fc-before", test, pipeline, size),
                        1.0,
                    )
                before = BEFORE_POOLED_VS_FORWARDER.get((test, pipeline, size))
                if before is None:
                    continue
                compare(
                    f"dedicated P{pipeline} {test} {size_label(size)} no slower than before: "
                    f">= {before:.2f}x byte forwarder (fc-passthrough before pooled mode)",
                    ("fc-dedicated", test, pipeline, size),
                    ("forwarder", test, pipeline, size),
                    before,
                )
    for size in sizes:
        for pipeline in (1, 16):
            for test in ("HSET", "HGET", "HGETALL"):
                compare(
                    f"protected {test} P{pipeline} {size_label(size)} >= 0.8x unprotected fields",
                    ("fc-protected", test, pipeline, size),
                    ("fc-unprotected", test, pipeline, size),
                    0.8,
                )
    idle = memory.get("idle") or {}
    thousand = next((p for p in idle.get("points", []) if p["requested"] == 1000), None)
    if thousand is None:
        out.append(
            {
                "goal": "RSS <= 60 MiB with 1,000 idle connections (dedicated mode)",
                "threshold": 60.0,
                "measured": None,
                "status": "not run",
                "why": idle.get("error", ""),
            }
        )
    else:
        mib = thousand["rss_kb"] / 1024
        out.append(
            {
                "goal": "RSS <= 60 MiB with 1,000 idle connections (dedicated mode)",
                "threshold": 60.0,
                "measured": mib,
                "status": "met" if mib <= 60 else "missed",
                "why": "",
            }
        )
    push = memory.get("nonreading") or {}
    if "bounded" in push:
        out.append(
            {
                "goal": "bounded RSS for a client that never reads",
                "threshold": None,
                "measured": push["rss_growth_second_half_kb"] / 1024,
                "status": "met" if push["bounded"] else "missed",
                "why": f"{push['bytes_written'] / 2**20:.0f} MiB written, "
                f"{push['stopped_because']}",
            }
        )
    else:
        out.append(
            {
                "goal": "bounded RSS for a client that never reads",
                "threshold": None,
                "measured": None,
                "status": "not run",
                "why": push.get("error", ""),
            }
        )
    return out


def _connections_goal(connections: dict[str, Any]) -> Row:
    """1,000 pooled clients that need no state: at most pool size x workers upstream
    connections, counted by Redis (spares included), idle and under redis-benchmark."""
    pooled = connections.get("pooled") or {}
    pool, workers = pooled.get("pool_size"), pooled.get("workers")
    name = "1,000 connected clients (pooled, no state) use <= upstream_pool_size x workers"
    phases = [pooled.get(k) or {} for k in ("idle_silent", "idle_after_ping", "active")]
    seen = [p.get("redis_sees") for p in phases]
    if pool is None or any(v is None for v in seen):
        why = pooled.get("error") or "not measured"
        return {"goal": name, "threshold": None, "measured": None, "status": "not run", "why": why}
    limit = pool * workers
    worst = max(v for v in seen if v is not None)
    shared = max(p.get("shared", 0) for p in phases)
    spare = max(p.get("spare", 0) for p in phases)
    return {
        "goal": f"{name} ({pool} x {workers} = {limit}) upstream connections",
        "threshold": limit,
        "measured": worst,
        "status": "met" if worst <= limit else "missed",
        "unit": "connections",
        "why": f"Redis sees at most {worst} (idle {seen[0]}, idle after a PING each {seen[1]}, "
        f"under redis-benchmark -c 1000 {seen[2]}); the proxy counts at most {shared} shared "
        f"+ {spare} spare (kept for clients that pin)",
    }


# --- Markdown -------------------------------------------------------------------------


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def _ms(value: float | None) -> str:
    """A latency; redis-benchmark records anything over 3 s as 3 s."""
    if value is not None and value >= HISTOGRAM_CEILING_MS:
        return "≥3,000"
    return _num(value, 3)


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        f"# fieldcrypt benchmark ({'quick' if meta['quick'] else 'full'})",
        "",
        f"{meta['started']}, {meta['cpus']} CPUs, load average {meta['loadavg_start']} at start, "
        f"{meta['loadavg_end']} at the end; "
        f"{meta['rounds']} round(s), median shown; {meta['clients']} clients; "
        f"took {meta['duration_s']:.0f} s. fieldcrypt: {meta.get('proxy', 'the working tree')}.",
        "Ratios: requests/s of the row over the reference's, measured back to back in each "
        "round; the median of the rounds' ratios. The client, Redis and the proxies share the "
        "cores: compare ratios, never absolute numbers across runs. A p99 of ≥3,000 ms is "
        "redis-benchmark's ceiling (its histogram stops at 3 s).",
        "",
    ]
    skipped = {k: v for k, v in result["targets"].items() if v.get("skipped")}
    for name, info in skipped.items():
        lines.append(f"- **{name}** not run: {info['skipped']}")
    if skipped:
        lines.append("")
    summary = result["summary"]
    sections = sorted({(r["size"], r["pipeline"]) for r in summary})
    before = any(r.get("x_fc-before") is not None for r in summary)
    if before:
        lines += [f"fc-before: proxy/ at {meta.get('before', '?')}", ""]
    for size, pipeline in sections:
        lines += [
            f"## pipeline {pipeline}, {size_label(size)} values",
            "",
            "| target | test | req/s | p50 ms | p99 ms | vs redis | vs twemproxy | vs forwarder "
            + ("| vs fc-before " if before else "")
            + "| proxy CPU s/100k |",
            "|---|---|--:|--:|--:|--:|--:|--:|" + ("--:|" if before else "") + "--:|",
        ]
        for r in summary:
            if (r["size"], r["pipeline"]) != (size, pipeline):
                continue
            rps = _num(r["rps"]) if r["rps"] is not None else "error"
            lines.append(
                f"| {r['target']} | {r['test']} | {rps} | {_ms(r['p50_ms'])} "
                f"| {_ms(r['p99_ms'])} | {_x(r['x_redis'])} | {_x(r['x_twemproxy'])} "
                f"| {_x(r['x_forwarder'])} "
                + (f"| {_x(r['x_fc-before'])} " if before else "")
                + f"| {_num(r['cpu_s_per_100k'], 2)} |"
            )
        lines.append("")
    lines += [
        "## processes (after the throughput runs)",
        "",
        "| target | pid(s) | peak RSS MiB (VmHWM) |",
        "|---|---|--:|",
    ]
    for name, info in result["targets"].items():
        if info.get("skipped") or "peak_rss_kb" not in info:
            continue
        lines.append(f"| {name} | {info.get('pids', '')} | {_num(info['peak_rss_kb'] / 1024, 1)} |")
    lines.append("")
    lines += _workers_md(result["workers"])
    lines += _connections_md(result.get("connections") or {}, result["runs"])
    lines += _memory_md(result["memory"])
    lines += [
        "## targets",
        "",
        "fc-passthrough is pooled (pool size 4), fc-dedicated one upstream connection per "
        'client; the "before" ratios are fc-passthrough\'s in the full run of 2026-12-07 '
        "18:38 UTC (before pooled mode). One round's ratio moves by ±0.2 on this machine.",
        "",
    ]
    for goal in result["goals"]:
        measured = goal["measured"]
        if measured is None:
            shown = ""
        elif goal.get("unit") == "connections":
            shown = f": {measured}"
        elif goal["threshold"] is None or "MiB" in goal["goal"]:
            shown = f": {measured:.1f} MiB" + (
                " growth over the second half" if goal["threshold"] is None else ""
            )
        else:
            shown = f": {measured:.2f}x"
            if len(goal.get("rounds", [])) > 1:
                shown += f" (rounds {min(goal['rounds']):.2f}-{max(goal['rounds']):.2f})"
        why = f" ({goal['why']})" if goal["why"] else ""
        lines.append(f"- **{goal['status']}** {goal['goal']}{shown}{why}")
    lines.append("")
    return "\n".join(lines)


def _connections_md(connections: dict[str, Any], runs: list[Row]) -> list[str]:
    lines = [
        "## upstream connections with 1,000 clients",
        "",
        "A fresh fieldcrypt per mode (passthrough, pool size 4, one worker), Redis with no "
        "other client: *Redis sees* is its connected_clients minus the count before the "
        "proxy started (the bench's INFO connection cancels out); shared / spare / dedicated "
        "are `FIELDCRYPT INFO upstream`. *Silent*: 1,000 connections opened, nothing sent; "
        "*after a PING*: each sent one PING, got +PONG and went quiet; *active*: the peak "
        "sampled every 0.2 s during `redis-benchmark -c 1000 -P 1` SET 64 B (the sampler's "
        "connection is one more client).",
        "",
        "| mode | phase | Redis sees | shared | spare | dedicated | req/s | proxy RSS MiB |",
        "|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for mode in ("pooled", "dedicated"):
        data = connections.get(mode) or {}
        if data.get("error"):
            lines.append(f"| {mode} | failed: {data['error']} | | | | | | |")
            continue
        for phase, label in (
            ("started", "started, no client"),
            ("idle_silent", "1,000 silent"),
            ("idle_after_ping", "1,000 after a PING"),
            ("active", "1,000 active"),
        ):
            p = data.get(phase)
            if not p:
                continue
            lines.append(
                f"| {mode} | {label} | {p.get('redis_sees', '—')} | {p.get('shared', '—')} "
                f"| {p.get('spare', '—')} | {p.get('dedicated', '—')} "
                f"| {_num(p.get('rps'))} | {p.get('rss_mib', '—')} |"
            )
    lines.append("")
    peaks = [r for r in runs if r.get("upstream_peak")]
    if peaks:
        lines += [
            "During the throughput runs' 1,000-client tests (the long-lived proxies; peak of "
            "`FIELDCRYPT INFO upstream`):",
            "",
            "| target | test | round | shared | spare | dedicated | total |",
            "|---|---|--:|--:|--:|--:|--:|",
        ]
        for r in peaks:
            peak = r["upstream_peak"]
            lines.append(
                f"| {r['target']} | {r['test']} | {r['round']} | {peak.get('shared', '—')} "
                f"| {peak.get('spare', '—')} | {peak.get('dedicated', '—')} "
                f"| {peak.get('total', '—')} |"
            )
        lines.append("")
    return lines


def _workers_md(workers: Row) -> list[str]:
    lines = ["## --workers scaling (passthrough, pipeline 16)", ""]
    if workers.get("skipped"):
        return [*lines, f"not run: {workers['skipped']}", ""]
    lines += [
        "| test | size | workers 1 req/s | workers 2 req/s | 2 vs 1 |",
        "|---|---|--:|--:|--:|",
    ]
    for row in workers.get("rows", []):
        lines.append(
            f"| {row['test']} | {size_label(row['size'])} | {_num(row['w1_rps'])} "
            f"| {_num(row['w2_rps'])} | {_x(row['w2_over_w1'])} |"
        )
    return [*lines, ""]


def _memory_md(memory: dict[str, Any]) -> list[str]:
    lines = [
        "## memory (passthrough proxy, a fresh process per test; the non-reading client "
        "through pooled mode)",
        "",
    ]
    idle = memory.get("idle") or {}
    if idle.get("points"):
        lines += [
            "Idle connections, dedicated mode (each with its upstream connection) "
            f"(RSS before any: {idle['baseline_rss_mib']} MiB; open-file limit "
            f"bench {idle['nofile_soft_bench']}, proxy {idle['nofile_soft_proxy']}):",
            "",
            "| requested | opened | upstream conns | RSS MiB | KiB per connection |",
            "|--:|--:|--:|--:|--:|",
        ]
        for p in idle["points"]:
            capped = " (fd limit)" if p["capped_by_fd_limit"] else ""
            lines.append(
                f"| {p['requested']:,} | {p['opened']:,}{capped} | {p['upstream_connections']:,} "
                f"| {p['rss_mib']} | {p['per_connection_kb']} |"
            )
        lines.append("")
    elif idle.get("error"):
        lines += [f"Idle connections: failed: {idle['error']}", ""]
    push = memory.get("nonreading") or {}
    if "bounded" in push:
        answers = "yes" if push["proxy_answers_after"] else "no"
        held = (
            "backpressure reached Redis: the proxy stopped reading replies instead of "
            "buffering them"
            if push["redis_output_buffer_bytes"]
            else "none: the replies fitted in the socket buffers, backpressure was not reached"
        )
        lines += [
            f"A client pipelining SET commands ({push['value_size']}-byte values) that never "
            "reads a reply:",
            "",
            f"- written: {push['bytes_written'] / MiB:,.0f} MiB of "
            f"{push['limit_bytes'] / MiB:,.0f} MiB in {push['seconds']} s "
            f"({push['stopped_because']})",
            f"- proxy RSS: {push['rss_before_kb'] / 1024:.1f} MiB before, "
            f"{push['rss_peak_kb'] / 1024:.1f} MiB peak, "
            f"{push['rss_after_close_kb'] / 1024:.1f} MiB after the client closed; growth over "
            f"the second half of the bytes: {push['rss_growth_second_half_kb'] / 1024:.1f} MiB",
            f"- replies held by Redis for the proxy (largest CLIENT LIST omem): "
            f"{push['redis_output_buffer_bytes'] / MiB:.1f} MiB ({held})",
            f"- proxy still answers PING afterwards: {answers}",
            "",
        ]
    elif push.get("error"):
        lines += [f"Non-reading client: failed: {push['error']}", ""]
    return lines


# --- chart ---------------------------------------------------------------------------


def chart(result: dict[str, Any], path: Path) -> str | None:
    """A PNG of throughput relative to direct Redis, and RSS under the non-reading client.
    Returns why it was skipped, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'fieldcrypt[bench]'): no chart"
    summary = result["summary"]
    sections = sorted({(r["size"], r["pipeline"]) for r in summary})
    push = result["memory"].get("nonreading") or {}
    panels = len(sections) + (1 if push.get("samples") else 0)
    columns = 2
    rows = (panels + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(14, 4.2 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    targets = [t for t in result["target_order"] if any(r["target"] == t for r in summary)]
    tests = list(TESTS)
    colors = {t: plt.get_cmap("tab10")(i % 10) for i, t in enumerate(targets)}
    width = 0.8 / max(1, len(targets))
    for ax, (size, pipeline) in zip(flat, sections, strict=False):
        shown = [  # the c=1000 tests run at pipeline 1 with 64 B only
            t for t in tests if any(find(summary, x, t, pipeline, size) for x in targets)
        ]
        for i, target in enumerate(targets):
            xs, ys = [], []
            for j, test in enumerate(shown):
                row = find(summary, target, test, pipeline, size)
                if row is not None and row["x_redis"] is not None:
                    xs.append(j + i * width - 0.4 + width / 2)
                    ys.append(row["x_redis"])
            ax.bar(xs, ys, width, label=target, color=colors[target])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(shown)), [t.replace(" c=", "\nc=") for t in shown])
        ax.set_ylabel("req/s relative to direct Redis")
        ax.set_title(f"pipeline {pipeline}, {size_label(size)} values")
    if sections:
        from matplotlib.patches import Patch

        handles = [Patch(color=colors[t], label=t) for t in targets]
        figure.legend(handles=handles, loc="upper center", ncol=len(targets), fontsize=8)
    if push.get("samples"):
        ax = flat[len(sections)]
        samples = push["samples"]
        ax.plot(
            [s["bytes_written"] / 2**20 for s in samples],
            [s["rss_kb"] / 1024 for s in samples],
            marker=".",
        )
        ax.set_xlabel("MiB written by a client that never reads")
        ax.set_ylabel("proxy RSS MiB")
        ax.set_ylim(0, max(s["rss_kb"] for s in samples) / 1024 * 1.25)
        ax.set_title("passthrough proxy (pooled) RSS under a non-reading client")
    for ax in flat[panels:]:
        ax.axis("off")
    figure.tight_layout(rect=(0, 0, 1, 0.96))
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return None
