"""The benchmark report: markdown with PNG plots, from a result file.

    python -m benchmarks report RESULTS.json [--compare OLD.json] [--out DIR] [--no-plots]

Writes DIR/README.md (default DIR: RESULTS.json's path with .report instead of .json) and, per
family, its figures beside it: the time of every candidate with peak memory next to it, the
ratio of the subject to each baseline with the target drawn in, one scaling curve per swept
size, and the fraction of the measured bandwidth / FLOP ceilings reached. Every figure and the
report name the environment (CPU model, instruction set, threads, torch, device, commit).
Without matplotlib the report has its tables and says how to get the plots.

Exit status: 0; with --compare, 1 when a case's subject is slower than in OLD.json by more than
the runs' spread (see benchmarks/compare.py), 2 when the two files have no case in common.
A file that cannot be read: 2.
"""

import argparse
import os
import re
import sys

from . import compare as cmp_mod
from . import plots
from .curves import curves
from .resultfile import ResultFile, env_line, fmt_ms, isa, machine


def _slug(s):
    return re.sub(r"[^A-Za-z0-9]+", "-", s).strip("-").lower() or "x"


def environment_md(rf):
    env = rf.env
    b = env.get("lrkernels_build") if isinstance(env.get("lrkernels_build"), dict) else {}
    rows = [("machine", machine(env)), ("CPU model", env.get("cpu_model") or env.get("device_name")),
            ("instruction set the kernels ran with", isa(env)),
            ("instruction sets compiled / detected", f"{b.get('cpu_capabilities_compiled', '?')} / "
                                                     f"{b.get('cpu_capability_detected', '?')}"),
            ("CPU kernel path", b.get("cpu_kernels", "?")), ("threads", env.get("cpu_threads")),
            ("device", f"{env.get('device')} ({env.get('device_name')})"), ("torch", env.get("torch")),
            ("CUDA", env.get("cuda")), ("python", env.get("python")), ("commit", env.get("commit")),
            ("date", env.get("date")), ("result file", f"`{rf.path}`")]
    if env.get("run_wall_s") is not None:
        rows.append(("the run took", f"{env['run_wall_s'] / 60:.1f} min"))
    ceil = env.get("ceilings")
    if ceil:
        rows.append(("measured ceilings", ", ".join(f"{k} {v:g}" for k, v in ceil.items())))
    return ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]


def targets_md(rf):
    lines = []
    for c in rf.cases:
        rat = rf.ratios(c)
        for b, t in (c.get("targets") or {}).items():
            v = rat.get(b)
            verdict = "not measured" if v is None else ("met" if v <= t else "**NOT met**")
            got = "" if v is None else f"{v:.3f}×"
            lines.append(f"| {rf.family(c)} | {c['name']} | {c['subject']} / {b} | {got} | ≤ {t:g} | {verdict} |")
    if not lines:
        return []
    head = ["## Targets", "", "| family | case | ratio | measured | target | |", "|---|---|---|---:|---:|---|"]
    return head + lines + [""]


def case_table(rf, cases):
    ceil = rf.env.get("ceilings") or {}
    bw = ceil.get("copy_GBps")
    lines = ["| case | candidate | median ms | IQR ms | runs | peak MB | subject / this | target | GB/s "
             "| of bandwidth |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cases:
        rat, tg = rf.ratios(c), c.get("targets") or {}
        for k, r in rf.results(c["name"]).items():
            if r.get("skipped"):
                lines.append(f"| {c['name']} | {k} | skipped: {r['skipped']} | | | | | | | |")
                continue
            mem = "" if r.get("peak_mem_mb") is None else f"{r['peak_mem_mb']:.1f}"
            gb = r.get("gbps")
            frac = f"{100 * gb / bw:.0f}%" if gb and bw else ""
            name = f"**{k}**" if k == c["subject"] else k
            t = f"≤ {tg[k]:g}" if k in tg else ""
            cells = [c["name"], name, fmt_ms(r["median_ms"]), fmt_ms(r.get("iqr_ms")), r.get("runs", ""), mem,
                     "" if k not in rat else f"{rat[k]:.3f}×", t, "" if not gb else f"{gb:.1f}", frac]
            lines.append("| " + " | ".join(str(x) for x in cells) + " |")
    return lines


def family_md(rf, family, cases, outdir, draw):
    lines = [f"## {family}", ""]
    took = [c["wall_s"] for c in cases if c.get("wall_s") is not None]
    if took:
        lines += [f"{len(cases)} cases, {sum(took):.0f} s of the run (set-up, timing and peak memory).", ""]
    notes = [f"- *{c['name']}*: {c['note']}" for c in cases if c.get("note")]
    figs = []
    if draw:
        stem = _slug(family)
        out = lambda kind: os.path.join(outdir, f"{stem}-{kind}.png")  # noqa: E731
        figs.append(("time and peak memory", plots.times(out("times"), rf, family, cases)))
        figs.append(("ratio to each baseline", plots.ratios(out("ratios"), rf, family, cases)))
        for sweep, lns in curves(cases).items():
            figs.append((f"scaling with {sweep}", plots.scaling(out(f"scaling-{_slug(sweep)}"), rf, family, sweep, lns,
                                                                rf.env.get("ceilings"))))
        if rf.env.get("ceilings"):
            figs.append(("fraction of the measured ceilings",
                         plots.ceiling_fractions(out("ceilings"), rf, family, cases, rf.env["ceilings"])))
    for title, path in figs:
        if path:
            lines += [f"![{family}: {title}]({os.path.basename(path)})", ""]
    lines += case_table(rf, cases) + [""]
    if notes:
        lines += ["Notes:", ""] + notes + [""]
    return lines, [p for _, p in figs if p]


def write(rf, outdir, old=None, draw=True):
    """Writes the report; returns (markdown path, png paths, comparison or None, plot message)."""
    os.makedirs(outdir, exist_ok=True)
    why_not = plots.missing() if draw else "--no-plots was given"
    md = [f"# lrkernels benchmarks: {machine(rf.env)}", "", env_line(rf.env), ""] + environment_md(rf) + [""]
    if why_not:
        md += [f"*No plots: {why_not}.*", ""]
    md += targets_md(rf)
    pngs = []
    for family, cases in rf.families().items():
        lines, ps = family_md(rf, family, cases, outdir, draw=why_not is None)
        md += lines
        pngs += ps
    comparison = None
    if old is not None:
        comparison = cmp_mod.compare(rf, old)
        md += [cmp_mod.markdown(comparison, rf, old)]
    path = os.path.join(outdir, "README.md")
    with open(path, "w") as f:
        f.write("\n".join(md).rstrip() + "\n")
    return path, pngs, comparison, why_not


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", metavar="RESULTS.json")
    ap.add_argument("--compare", metavar="OLD.json", help="an older result file to compare each case with")
    ap.add_argument("--out", help="report folder (default: RESULTS.report beside the file)")
    ap.add_argument("--no-plots", action="store_true", help="tables only")
    a = ap.parse_args(argv)
    try:
        rf = ResultFile(a.results)
        old = ResultFile(a.compare) if a.compare else None
    except (OSError, ValueError) as e:
        print(f"benchmarks report: cannot read a result file: {e}", file=sys.stderr)
        return cmp_mod.NOTHING_COMPARABLE
    outdir = a.out or os.path.splitext(a.results)[0] + ".report"
    path, pngs, comparison, why_not = write(rf, outdir, old, draw=not a.no_plots)
    if why_not and not a.no_plots:
        print(f"benchmarks report: {why_not}", file=sys.stderr)
    print(f"wrote {path} ({len(pngs)} plots)")
    if comparison is None:
        return 0
    print(cmp_mod.summary(comparison))
    return comparison.exit_code


if __name__ == "__main__":
    sys.exit(main())
