"""Medians, ratios and the printed tables of a benchmark run.

Every figure is the median over repetitions (runs marked ``discarded`` for
foreign load, and failed runs, are left out; the tables say how many runs
count). Ratios are ratios of medians, against ``direct`` and against
``portforward`` measured in the same run: absolute figures on a shared
2-core machine drift between sessions, same-run ratios much less.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Figure:
    """One headline figure: which group's runs, which key, how to print, which way is better."""

    key: str
    group: str
    field: str
    title: str
    unit: str
    higher_is_better: bool = True
    digits: int = 0


FIGURES = [
    Figure("gbit_s", "iperf", "gbit_s", "iperf3 single stream", "Gbit/s", digits=2),
    Figure("mb_per_cpu_s", "iperf", "mb_per_cpu_s", "bulk efficiency", "MB per proxy CPU-s"),
    Figure("ka_rps", "wrk_ka", "rps", "wrk keep-alive", "req/s"),
    Figure("close_rps", "wrk_close", "rps", "wrk Connection: close", "req/s"),
    Figure(
        "rss_kb_per_conn",
        "idle",
        "rss_kb_per_conn",
        "RSS per idle connection (1,000 held)",
        "KB/conn",
        higher_is_better=False,
        digits=1,
    ),
]

#: Extra columns of each group's detail table: (field, header, digits).
DETAILS: dict[str, list[tuple[str, str, int]]] = {
    "iperf": [
        ("gbit_s", "Gbit/s", 2),
        ("mb_per_cpu_s", "MB per proxy CPU-s", 0),
        ("proxy_cpu_pct", "proxy CPU %", 0),
        ("client_cpu_pct", "iperf3 client CPU %", 0),
        ("backend_cpu_pct", "iperf3 server CPU %", 0),
        ("busy_pct", "machine busy %", 0),
        ("kthreads_cpu_pct", "kernel threads CPU %", 0),
        ("steal_pct", "steal %", 1),
        ("foreign_pct", "foreign %", 0),
    ],
    "wrk_ka": [
        ("rps", "req/s", 0),
        ("p50_ms", "p50 ms", 2),
        ("p99_ms", "p99 ms", 2),
        ("proxy_cpu_pct", "proxy CPU %", 0),
        ("req_per_cpu_s", "req per proxy CPU-s", 0),
        ("socket_errors", "socket errors", 0),
        ("foreign_pct", "foreign %", 0),
    ],
    "idle": [
        ("rss_kb_per_conn", "ΔRSS KB/conn", 1),
        ("pss_kb_per_conn", "ΔPSS KB/conn", 1),
        ("idle_rss_mb", "idle RSS MB", 1),
        ("held_rss_mb", "RSS MB with 1,000", 1),
        ("processes_held", "processes", 0),
        ("setup_cpu_ms_per_conn", "setup CPU ms/conn", 3),
    ],
}
DETAILS["wrk_close"] = DETAILS["wrk_ka"]
DETAILS["balance"] = [
    ("rps", "req/s", 0),
    ("proxy_cpu_pct", "proxy CPU %", 0),
    ("req_per_cpu_s", "req per proxy CPU-s", 0),
    ("backend_cpu_pct", "backend CPU %", 0),
    ("share_min_pct", "least-served backend %", 1),
    ("share_max_pct", "most-served backend %", 1),
    ("served_elsewhere", "served by other ports", 0),
    ("socket_errors", "socket errors", 0),
    ("foreign_pct", "foreign %", 0),
]

#: Issue 15: new connections/s over several backends at least this share of one backend's.
BALANCE_TARGET = 0.95
#: A spread counts as even when the least-served backend had at least this share of an
#: even split (20 % of the requests over 4): a rate with everything on one backend is no
#: balancing figure.
BALANCE_EVEN = 0.8

GROUP_TITLES = {
    "iperf": "iperf3, one stream, client -> proxy -> iperf3 -s",
    "wrk_ka": "wrk -t2 -c50, keep-alive, 1 KiB body",
    "wrk_close": "wrk -t2 -c50 -H 'Connection: close', 1 KiB body",
    "idle": "1,000 idle connections held through the proxy (echo backend)",
    "balance": "new connections: wrk -t2 -c50 -H 'Connection: close', 1 KiB body, "
    "one nginx worker on every backend port",
}


def counted(runs: list[dict[str, Any]], proxy: str, group: str) -> list[dict[str, float]]:
    """The figures of the runs that count: succeeded and not discarded."""
    return [
        r["figures"]
        for r in runs
        if r["proxy"] == proxy and r["group"] == group and r["ok"] and not r["discarded"]
    ]


def values(runs: list[dict[str, Any]], proxy: str, group: str, field: str) -> list[float]:
    return [f[field] for f in counted(runs, proxy, group) if field in f]


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarize(runs: list[dict[str, Any]], proxies: list[str]) -> dict[str, dict[str, Any]]:
    """Per proxy and figure: median, min, max, n, and the ratios to direct and portforward."""
    out: dict[str, dict[str, Any]] = {}
    for fig in FIGURES:
        base = {
            ref: median(values(runs, ref, fig.group, fig.field))
            for ref in ("direct", "portforward")
        }
        for proxy in proxies:
            xs = values(runs, proxy, fig.group, fig.field)
            m = median(xs)
            entry: dict[str, Any] = {"median": m, "n": len(xs)}
            if xs:
                entry["min"], entry["max"] = min(xs), max(xs)
            for ref, b in base.items():
                entry[f"x_{ref}"] = m / b if m is not None and b else None
            out.setdefault(proxy, {})[fig.key] = entry
    return out


def _num(x: float | None, digits: int = 0) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    align = ["---"] + ["---:"] * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def summary_table(summary: dict[str, dict[str, Any]], proxies: list[str]) -> str:
    """Medians of every headline figure, one row per proxy."""
    headers = ["system"] + [f"{f.title} ({f.unit})" for f in FIGURES]
    rows = []
    for p in proxies:
        rows.append([p] + [_num(summary[p][f.key]["median"], f.digits) for f in FIGURES])
    return _table(headers, rows)


def ratio_table(summary: dict[str, dict[str, Any]], proxies: list[str], ref: str) -> str:
    """Every headline figure as a ratio to ``ref`` (for memory, below 1 is better)."""
    headers = ["system"] + [f"{f.title} x {ref}" for f in FIGURES]
    rows = []
    for p in proxies:
        rows.append([p] + [_ratio(summary[p][f.key][f"x_{ref}"]) for f in FIGURES])
    return _table(headers, rows)


def detail_table(runs: list[dict[str, Any]], proxies: list[str], group: str) -> str:
    """Medians of every recorded field of one group, with the min-max of the first."""
    columns = DETAILS[group]
    headers = ["system", "n"] + [h for _, h, _ in columns]
    headers.insert(3, "min-max")
    rows = []
    for p in proxies:
        figs = counted(runs, p, group)
        if not figs and not any(r["proxy"] == p and r["group"] == group for r in runs):
            continue
        row = [p, str(len(figs))]
        for i, (field, _, digits) in enumerate(columns):
            xs = [f[field] for f in figs if field in f]
            row.append(_num(median(xs), digits))
            if i == 0:
                row.append(f"{_num(min(xs), digits)}-{_num(max(xs), digits)}" if xs else "-")
        rows.append(row)
    return _table(headers, rows)


def peer_check(summary: dict[str, dict[str, Any]], proxies: list[str]) -> list[str]:
    """Each tunnelkit row against the best other proxy of the run, figure by figure.

    The performance issue's targets are stated that way: ahead of every
    peer (no worse, for memory), workers allowed.
    """
    peers = [p for p in proxies if p != "direct" and not p.startswith("tunnelkit")]
    ours = [p for p in proxies if p.startswith("tunnelkit")]
    if not peers:
        return ["no other proxy was measured in this run"]
    lines: list[str] = []
    for fig in FIGURES:
        measured = [(summary[p][fig.key]["median"], p) for p in peers]
        measured = [(m, p) for m, p in measured if m is not None]
        if not measured:
            continue
        best, best_name = (max if fig.higher_is_better else min)(measured)
        for p in ours:
            m = summary[p][fig.key]["median"]
            if m is None:
                continue
            ratio = m / best if best else None
            ahead = ratio is not None and (ratio >= 1.0 if fig.higher_is_better else ratio <= 1.0)
            lines.append(
                f"{fig.title}: {p} {_num(m, fig.digits)} against {best_name}"
                f" {_num(best, fig.digits)} {fig.unit} = {_ratio(ratio)}:"
                f" {'AHEAD' if ahead else 'BEHIND'}"
            )
    return lines


class BalanceRow(Protocol):
    """A row of the balance figure (peers.BalanceRow): its name, system, how many backends."""

    @property
    def name(self) -> str: ...
    @property
    def system(self) -> str: ...
    @property
    def backends(self) -> int: ...
    @property
    def balance(self) -> str: ...


def balance_summary(runs: list[dict[str, Any]], rows: Sequence[BalanceRow]) -> dict[str, Any]:
    """Median rates and spreads per row, and the ratios issue 15 asks for.

    For each system: its rate over N backends / over one (at least
    :data:`BALANCE_TARGET`); each tunnelkit row over N / every other proxy
    over N (ahead means >= 1); and the backend's headroom: ``direct`` / the
    fastest proxied row (above 1: the backends were not what limited).
    """
    rate = {r.name: median(values(runs, r.name, "balance", "rps")) for r in rows}
    out: dict[str, Any] = {"rows": {}, "scaling": {}, "against": {}, "headroom": None}
    for r in rows:
        out["rows"][r.name] = {
            "system": r.system,
            "backends": r.backends,
            "rps": rate[r.name],
            "n": len(values(runs, r.name, "balance", "rps")),
            "share_min_pct": median(values(runs, r.name, "balance", "share_min_pct")),
            "share_max_pct": median(values(runs, r.name, "balance", "share_max_pct")),
        }
        out["rows"][r.name]["even"] = _even(out["rows"][r.name])
    many = {r.system: r.name for r in rows if r.backends > 1}
    one = {r.system: r.name for r in rows if r.backends == 1 and r.system in many}
    for system, name in many.items():
        out["scaling"][name] = _quotient(rate[name], rate[one[system]])
    ours = [name for system, name in many.items() if system.startswith("tunnelkit")]
    theirs = [name for system, name in many.items() if not system.startswith("tunnelkit")]
    for name in ours:
        for other in theirs:
            out["against"][f"{name} / {other}"] = _quotient(rate[name], rate[other])
    proxied = [m for r in rows if r.system != "direct" and (m := rate[r.name])]
    if proxied and "direct" in rate:
        out["headroom"] = _quotient(rate["direct"], max(proxied))
    return out


def _even(row: dict[str, Any]) -> bool:
    """Whether a row's least-served backend had its share of an even split (BALANCE_EVEN)."""
    least = row["share_min_pct"]
    return least is not None and least >= BALANCE_EVEN * 100 / row["backends"]


def _quotient(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def balance_lines(summary: dict[str, Any]) -> list[str]:
    """The balance figure's verdicts, one line each, from :func:`balance_summary`."""
    rows = summary["rows"]
    lines = []
    for name, ratio in summary["scaling"].items():
        system = rows[name]["system"]
        base = next(n for n, r in rows.items() if r["system"] == system and r["backends"] == 1)
        verdict = ""
        if system.startswith("tunnelkit") and ratio is not None:
            met = ratio >= BALANCE_TARGET and _even(rows[name])
            verdict = (
                f" (target >= {BALANCE_TARGET:.2f}x, spread even: {'MET' if met else 'MISSED'})"
            )
        lines.append(
            f"{name} / {base}: {_num(rows[name]['rps'])} / {_num(rows[base]['rps'])} req/s"
            f" = {_ratio(ratio)}{verdict}"
        )
    for key, ratio in summary["against"].items():
        verdict = "not measured" if ratio is None else "AHEAD" if ratio >= 1.0 else "BEHIND"
        lines.append(f"{key}: {_ratio(ratio)}: {verdict}")
    for name, row in rows.items():
        if row["backends"] > 1 and row["share_min_pct"] is not None:
            lines.append(
                f"{name}: each of {row['backends']} backends served"
                f" {_num(row['share_min_pct'], 1)}-{_num(row['share_max_pct'], 1)} %"
                f" of the requests (even: {100 / row['backends']:.1f}):"
                f" {'EVEN' if _even(row) else 'UNEVEN'}"
            )
    headroom = summary["headroom"]
    lines.append(
        f"backend headroom: direct / fastest proxied row = {_ratio(headroom)}"
        + (" (the backend was not the limit)" if headroom and headroom > 1 else "")
    )
    return lines


def render_balance(runs: list[dict[str, Any]], rows: Sequence[BalanceRow]) -> str:
    """The balance figure's section: the detail table and the verdicts."""
    names = [r.name for r in rows]
    strategy = ", ".join(sorted({r.balance for r in rows}))
    title = f"{GROUP_TITLES['balance']}; --balance {strategy}"
    parts = [f"## {title}", "", detail_table(runs, names, "balance"), ""]
    parts += ["## Balancing: rate over several backends, and against the peers", ""]
    parts += [f"- {line}" for line in balance_lines(balance_summary(runs, rows))]
    return "\n".join(parts)


#: The figure groups of the headline tables (the balance figure has its own rows and section).
HEADLINE_GROUPS = ("iperf", "wrk_ka", "wrk_close", "idle")


def render(
    runs: list[dict[str, Any]],
    proxies: list[str],
    groups: list[str],
    balance: Sequence[BalanceRow] = (),
) -> str:
    """The whole printed report: headline medians, ratios, details, the check against peers,
    and the balance figure's section when it ran (``balance``: its rows)."""
    parts = []
    headline = [g for g in groups if g in HEADLINE_GROUPS]
    if headline:
        parts += _headline(runs, proxies, headline)
    if balance:
        parts += [render_balance(runs, balance), ""]
    failed = [r for r in runs if not r["ok"]]
    discarded = [r for r in runs if r["ok"] and r["discarded"]]
    if failed or discarded:
        parts.append("## Failed or discarded runs")
        parts.append("")
        for r in failed:
            parts.append(f"- FAILED {r['proxy']} {r['group']} rep {r['rep']}: {r['error']}")
        for r in discarded:
            parts.append(
                f"- discarded {r['proxy']} {r['group']} rep {r['rep']}: "
                f"foreign load {r['figures'].get('foreign_pct', 0):.0f} %"
            )
        parts.append("")
    if headline:
        parts += ["## Against the best other proxy", ""]
        parts += [f"- {line}" for line in peer_check(summarize(runs, proxies), proxies)]
    return "\n".join(parts)


def _headline(runs: list[dict[str, Any]], proxies: list[str], groups: list[str]) -> list[str]:
    """Medians and ratios of the headline figures, then each group's details."""
    summary = summarize(runs, proxies)
    parts = [
        "## Medians",
        "",
        summary_table(summary, proxies),
        "",
        "## Ratios to direct",
        "",
        ratio_table(summary, proxies, "direct"),
        "",
        "## Ratios to portforward (memory: below 1 is better)",
        "",
        ratio_table(summary, proxies, "portforward"),
        "",
    ]
    for group in groups:
        parts += [f"## {GROUP_TITLES[group]}", "", detail_table(runs, proxies, group), ""]
    return parts
