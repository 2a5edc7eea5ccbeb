"""The report's PNG figures, one function per kind; each writes one file and names the
environment at its foot. matplotlib is optional: `missing()` says why plots cannot be drawn.

Bars are horizontal and grouped by case, with the case's name written above its group, so
long case names never crowd the axis."""

import math

from .resultfile import env_line, fmt_ms

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
           "#d62728", "#aec7e8", "#ffbb78"]


def missing():
    """None when matplotlib can be imported, else a sentence saying how to get the plots."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        return f"matplotlib is not installed ({e}); `pip install matplotlib` for the plots (tables are written)"
    return None


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def colors(rf, cases):
    """candidate -> colour, the subjects first, stable within a family."""
    order = []
    for c in cases:
        for k in [c["subject"]] + list(rf.results(c["name"])):
            if k not in order:
                order.append(k)
    return {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(order)}


def _finish(fig, plt, path, env, title):
    fig.suptitle(title, fontsize=11, x=0.01, ha="left")
    # below the figure: the tight bounding box takes it in, and it never overlaps an axis label
    fig.text(0.01, -0.005, env_line(env), fontsize=7, color="#555555", ha="left", va="top")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _log_if_wide(ax, values, axis="x"):
    v = [x for x in values if x and x > 0]
    if v and max(v) / min(v) > 30:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")


def _plain():
    from matplotlib.ticker import FuncFormatter

    def f(v, _):
        lead = f"{v:.0e}"[0] if v > 0 else "0"
        return fmt_ms(v) if lead in "125" else ""  # 1, 2, 5 of each decade: readable, not crowded

    return FuncFormatter(f)


def _times_axis(ax, axis="x"):
    """Plain 0.5× / 1× / 2× tick labels on a log axis."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    a = ax.xaxis if axis == "x" else ax.yaxis
    a.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    a.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    a.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))


def _grouped_rows(groups):
    """groups: [(header, [row, ...])] -> y positions: a header slot, then one slot per row."""
    y, layout = 0, []
    for header, rows in groups:
        layout.append(("header", y, header))
        y += 1
        for row in rows:
            layout.append(("row", y, row))
            y += 1
        y += 0.4
    return layout, y


def _header_text(ax, layout):
    import matplotlib.transforms as mt

    tr = mt.blended_transform_factory(ax.transAxes, ax.transData)
    for kind, y, h in layout:
        if kind == "header":
            ax.text(0.005, y + 0.25, h, transform=tr, fontsize=8, fontweight="bold", va="center", ha="left")


def times(path, rf, family, cases):
    """Median time of every candidate (IQR as error bar) and, beside it, peak memory."""
    plt = _plt()
    col = colors(rf, cases)
    groups = [(c["name"], sorted(rf.results(c["name"]).values(), key=lambda r: r["candidate"] != c["subject"]))
              for c in cases]
    layout, height = _grouped_rows(groups)
    has_mem = any(r.get("peak_mem_mb") is not None for _, rs in groups for r in rs)
    fig, axes = plt.subplots(1, 2 if has_mem else 1, figsize=(12 if has_mem else 8, 1.2 + 0.24 * height),
                             sharey=True, squeeze=False, gridspec_kw={"width_ratios": [3, 2] if has_mem else [1]},
                             layout="constrained")
    panels = [(axes[0][0], "median_ms", "median time, ms (IQR bar)")]
    if has_mem:
        panels.append((axes[0][1], "peak_mem_mb", "peak memory of one iteration, MB"))
    for ax, key, label in panels:
        vals = []
        for kind, y, r in layout:
            if kind != "row":
                continue
            v = r.get(key)
            if r.get("skipped") or v is None or not math.isfinite(v):
                ax.text(0, y, f"  {r['candidate']}: {'skipped' if r.get('skipped') else 'not measured'}",
                        fontsize=7, va="center", color="#777777", transform=ax.get_yaxis_transform())
                continue
            err = r.get("iqr_ms", 0) / 2 if key == "median_ms" else None
            ax.barh(y, v, height=0.8, color=col[r["candidate"]], xerr=err, capsize=2,
                    label=r["candidate"], error_kw={"elinewidth": 0.8})
            ax.text(v + (err or 0), y, f" {fmt_ms(v)}", fontsize=7, va="center")
            vals.append(v)
        _log_if_wide(ax, vals)
        if ax.get_xscale() == "log":
            ax.xaxis.set_major_formatter(_plain())
            ax.xaxis.set_minor_formatter(_plain())
        ax.set_xlabel(label, fontsize=9)
        ax.margins(x=0.15)
        ax.tick_params(labelsize=8)
        ax.grid(axis="x", alpha=0.3)
    ax0 = axes[0][0]
    ax0.set_yticks([])
    ax0.set_ylim(height, -1)
    _header_text(ax0, layout)
    handles = {h.get_label(): h for h in ax0.get_legend_handles_labels()[0]}
    names = [k for k in col if k in handles]
    # above the panels, where it cannot cover a bar
    fig.legend([handles[k] for k in names], names, fontsize=7, loc="outside upper center", ncol=min(len(names), 6))
    return _finish(fig, plt, path, rf.env, f"{family}: time of each candidate" + (" and its peak memory" if has_mem
                                                                               else ""))


def ratios(path, rf, family, cases):
    """Subject time / baseline time per case and baseline, the target drawn as a red line.
    Returns None when no case has a ratio."""
    groups = [(c["name"], [(b, v, c.get("targets", {}).get(b)) for b, v in rf.ratios(c).items()]) for c in cases]
    groups = [(h, rows) for h, rows in groups if rows]
    if not groups:
        return None
    plt = _plt()
    layout, height = _grouped_rows(groups)
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.24 * height), layout="constrained")
    vals, labelled = [], False
    for kind, y, row in layout:
        if kind != "row":
            continue
        b, v, t = row
        color = "#999999" if t is None else ("#2ca02c" if v <= t else "#d62728")
        ax.barh(y, v - 1.0, left=1.0, height=0.75, color=color)  # from 1: left faster, right slower
        ax.text(max(v, 1.0, t or 0), y, f"  {v:.2f}×  vs {b}", fontsize=7, va="center")
        vals.append(v)
        if t is not None:
            ax.plot([t, t], [y - 0.45, y + 0.45], color="#b00000", lw=2, label=None if labelled else "target")
            labelled = True
            vals.append(t)
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xscale("log")
    lo, hi = min(vals + [1.0]), max(vals + [1.0])
    ax.set_xlim(lo / 1.3, hi * 2.2)
    _times_axis(ax)
    ax.set_yticks([])
    ax.set_ylim(height, -1)
    subjects = " / ".join(sorted({c["subject"] for c in cases}))
    ax.set_xlabel(f"subject ({subjects}) time / baseline time (log; < 1: subject faster; green: target met, "
                  "red: not met)", fontsize=8)
    ax.grid(axis="x", alpha=0.3, which="both")
    _header_text(ax, layout)
    if labelled:
        ax.legend(fontsize=7, loc="lower right")
    return _finish(fig, plt, path, rf.env, f"{family}: ratio to each baseline")


def scaling(path, rf, family, sweep, lines, ceilings):
    """One scaling curve: time of each candidate against the swept size, the subject's ratio to
    each baseline, and its achieved GB/s against the measured bandwidth when it has one.
    lines: [(label, [(x, case), ...])] with x sorted."""
    plt = _plt()
    all_cases = [c for _, pts in lines for _, c in pts]
    col = colors(rf, all_cases)
    subject = all_cases[0]["subject"]
    gbps = [(lab, [(x, rf.timed(c["name"]).get(subject, {}).get("gbps")) for x, c in pts]) for lab, pts in lines]
    has_bw = any(v for _, pts in gbps for _, v in pts)
    n = 3 if has_bw else 2
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4), squeeze=False, layout="constrained")
    ax_t, ax_r = axes[0][0], axes[0][1]
    styles = ["-", "--", ":", "-."]
    numeric = all(isinstance(x, (int, float)) for _, pts in lines for x, _ in pts)
    xs_all = []
    for _, pts in lines:
        xs_all += [x for x, _ in pts if x not in xs_all]
    if numeric:
        xs_all.sort()
    pos = (lambda x: x) if numeric else (lambda x: xs_all.index(x))
    for li, (lab, pts) in enumerate(lines):
        ls = styles[li % len(styles)]
        suffix = f" [{lab}]" if lab else ""
        cands = []
        for _, c in pts:
            cands += [k for k in rf.timed(c["name"]) if k not in cands]
        # the subject last and thicker, so a candidate with nearly the same times cannot hide it
        cands.sort(key=lambda k: k == subject)
        for k in cands:
            xy = [(pos(x), rf.timed(c["name"])[k]["median_ms"]) for x, c in pts if k in rf.timed(c["name"])]
            ax_t.plot(*zip(*xy), ls, marker="o", ms=4, color=col[k], label=k + suffix,
                      lw=2.6 if k == subject else 1.3, zorder=3 if k == subject else 2)
        baselines = []
        for _, c in pts:
            baselines += [b for b in c.get("baselines", []) if b not in baselines]
        for b in baselines:
            xy = [(pos(x), rf.ratios(c)[b]) for x, c in pts if b in rf.ratios(c)]
            if xy:
                ax_r.plot(*zip(*xy), ls, marker="o", ms=4, color=col.get(b, "#333333"), label=f"vs {b}{suffix}")
            tg = [(pos(x), c["targets"][b]) for x, c in pts if b in c.get("targets", {})]
            if tg:
                ax_r.plot(*zip(*tg), color="#b00000", lw=2, ls=ls, marker="_", ms=16, mew=2.5,
                          label=f"target vs {b}")
    ax_r.axhline(1.0, color="black", lw=0.8, ls=":")
    for ax in (ax_t, ax_r) + ((axes[0][2],) if has_bw else ()):
        ax.set_xlabel(sweep, fontsize=9)
        if numeric and len(xs_all) > 1 and xs_all[-1] / max(xs_all[0], 1e-12) >= 4:
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs_all, [f"{x:g}" for x in xs_all])
            ax.xaxis.set_minor_formatter(_plain())
        if not numeric:
            ax.set_xticks(range(len(xs_all)), [str(x) for x in xs_all])
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3, which="both")
    if numeric and len(xs_all) > 1:
        ax_t.set_yscale("log")
        ax_t.yaxis.set_major_formatter(_plain())
        ax_t.yaxis.set_minor_formatter(_plain())
    ax_t.set_ylabel("median time, ms", fontsize=9)
    subjects = sorted({c["subject"] for c in all_cases})
    ax_r.set_ylabel(f"{' / '.join(subjects)} time / baseline time", fontsize=9)
    ax_t.legend(fontsize=7)
    ax_r.legend(fontsize=7)
    if has_bw:
        ax_b = axes[0][2]
        for li, (lab, pts) in enumerate(gbps):
            xy = [(pos(x), v) for x, v in pts if v]
            if xy:
                ax_b.plot(*zip(*xy), styles[li % len(styles)], marker="o", ms=4, color=col[subject],
                          label=f"{subject} achieved" + (f" [{lab}]" if lab else ""))
        bw = (ceilings or {}).get("copy_GBps")
        if bw:
            ax_b.axhline(bw, color="#b00000", lw=1.5, label=f"measured copy bandwidth {bw:g} GB/s")
        ax_b.set_ylim(bottom=0)
        ax_b.set_ylabel("GB/s (fewest bytes one iteration must move)", fontsize=9)
        ax_b.legend(fontsize=7)
    return _finish(fig, plt, path, rf.env, f"{family}: scaling with {sweep}")


_DTYPES = ("bf16", "fp16", "fp32", "fp64")
_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float64": "fp64"}


def flop_ceiling_key(case_name, ceilings):
    """The measured matmul ceiling for the precision a case computes in, or None when the run
    did not measure one for it. The precision is read from the case's name: a 16-bit activation
    dtype wins over fp32 (a bf16 case with fp32 adapters runs its GEMMs in bf16)."""
    words = {_DTYPE_ALIASES.get(w, w) for w in case_name.replace("(", " ").replace(")", " ").split()}
    for d in _DTYPES:
        if d in words:
            key = f"{d}_matmul_TFLOPs"
            return key if key in ceilings else None
    return None


def ceiling_fractions(path, rf, family, cases, ceilings):
    """Fraction of the measured bandwidth and FLOP ceilings each case's subject reaches.
    Returns None when no subject has an achieved rate or the run measured no ceiling."""
    bw = ceilings.get("copy_GBps")
    rows = []
    for c in cases:
        s = rf.timed(c["name"]).get(c["subject"], {})
        fl_key = flop_ceiling_key(c["name"], ceilings)
        fr = [("bandwidth", s["gbps"] / bw) if s.get("gbps") and bw else None,
              (f"{fl_key.split('_')[0]} FLOP rate", s["tflops"] / ceilings[fl_key])
              if s.get("tflops") and fl_key else None]
        fr = [f for f in fr if f]
        if fr:
            rows.append((c["name"], fr))
    if not rows:
        return None
    plt = _plt()
    layout, height = _grouped_rows(rows)
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.24 * height), layout="constrained")
    top = 0.0
    for kind, y, (what, v) in ((k, y, r) for k, y, r in layout if k == "row"):
        ax.barh(y, v, height=0.75, color="#1f77b4" if what == "bandwidth" else "#ff7f0e")
        ax.text(v, y, f" {100 * v:.0f}% of the {what} ceiling", fontsize=7, va="center")
        top = max(top, v)
    ax.axvline(1.0, color="black", lw=0.8, ls=":")
    ax.set_xlim(0, max(1.6, 1.6 * top))  # room for the longest bar's label
    ax.set_yticks([])
    ax.set_ylim(height, -1)
    _header_text(ax, layout)
    ax.set_xlabel("fraction of the measured ceiling (" + ", ".join(f"{k} {v:g}" for k, v in ceilings.items()) + ")",
                  fontsize=8)
    title = f"{family}: {rf.env.get('device')} ceilings reached by {cases[0]['subject']}"
    return _finish(fig, plt, path, rf.env, title)
