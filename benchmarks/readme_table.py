"""The README's measured-speed table, generated from one named result file.

    python -m benchmarks readme-table RESULTS.json           # print the block
    python -m benchmarks readme-table RESULTS.json --write   # put it in README.md between the markers
    python -m benchmarks readme-table --check                # does README.md match its named file?

The block sits between BEGIN and END markers; the BEGIN marker names the result file (relative
to the README), so the check regenerates the block from that file and compares. One row per
headline case (harness.Case.headline; the extra points of scaling curves are left out).
Exit status: 0 written / matches; 1 (--check) the README's table differs from its result
file, or the README has no markers or names a file that cannot be read; 2 (otherwise) no
markers, or a file that cannot be read.
"""

import argparse
import difflib
import os
import re
import sys

from .resultfile import ResultFile, env_line, fmt_ms

BEGIN = "<!-- BEGIN bench-table source={source} (generated: python -m benchmarks readme-table; do not edit) -->"
END = "<!-- END bench-table -->"
_BEGIN_RE = re.compile(r"<!-- BEGIN bench-table source=(\S+) .*?-->")
DEFAULT_README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _mem(r):
    return "" if r.get("peak_mem_mb") is None else f", {r['peak_mem_mb']:.1f} MB"


def row(rf, case):
    timed, rat, tg = rf.timed(case["name"]), rf.ratios(case), case.get("targets") or {}
    subj = case["subject"]
    s = timed.get(subj)
    who = "" if subj == "lrkernels" else f"{subj} "
    first = "not measured" if s is None else f"{who}{fmt_ms(s['median_ms'])} ms{_mem(s)}"
    parts = []
    for k, r in timed.items():
        if k == subj:
            continue
        if k in rat:
            t = "" if k not in tg else f", target ≤ {tg[k]:g}: {'met' if rat[k] <= tg[k] else '**NOT met**'}"
            parts.append(f"{k} {fmt_ms(r['median_ms'])} ms{_mem(r)} (**{rat[k]:.2f}×**{t})")
        else:
            parts.append(f"{k} {fmt_ms(r['median_ms'])} ms")
    for k, r in rf.results(case["name"]).items():
        if r.get("skipped") and k != "*":
            parts.append(f"{k}: skipped")
    label = f"{case['family']}: {case['name']}" if case.get("family") else case["name"]
    return f"| {label} | {first} | {'; '.join(parts)} |"


def block(rf, source):
    """The text between (and including) the markers."""
    rows = [row(rf, c) for c in rf.cases if c.get("headline", True)]
    return "\n".join([
        BEGIN.format(source=source),
        f"Measured on {env_line(rf.env)}, from `{source}`. Medians of interleaved runs; peak memory is the "
        "resident high-water mark of one iteration; ratios are the subject's time over the baseline's "
        "(below 1: lrkernels is faster).",
        "",
        "| case | lrkernels | baselines: time (lrkernels / baseline) |",
        "|---|---|---|",
        *rows,
        END])


def _span(text):
    m = _BEGIN_RE.search(text)
    end = text.find(END, m.end()) if m else -1
    if not m or end < 0:
        return None
    return m.start(), end + len(END), m.group(1)


def check(readme_text, readme_dir):
    """[] when the README's block matches its named result file, else the lines that differ
    (a unified diff, or one line saying what is missing)."""
    span = _span(readme_text)
    if span is None:
        return ["README has no bench-table markers"]
    start, end, source = span
    try:
        rf = ResultFile(os.path.join(readme_dir, source))
    except (OSError, ValueError) as e:
        return [f"cannot read the table's result file {source}: {e}"]
    want = block(rf, source)
    have = readme_text[start:end]
    if have == want:
        return []
    return list(difflib.unified_diff(have.splitlines(), want.splitlines(), "README.md", f"generated from {source}",
                                     lineterm=""))


def replace(readme_text, new_block):
    span = _span(readme_text)
    if span is None:
        raise ValueError("README has no bench-table markers (BEGIN/END bench-table)")
    return readme_text[:span[0]] + new_block + readme_text[span[1]:]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks readme-table", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="?", metavar="RESULTS.json")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true", help="replace the README's table with the generated one")
    g.add_argument("--check", action="store_true", help="exit 1 when the README's table differs from its file")
    ap.add_argument("--readme", default=DEFAULT_README)
    a = ap.parse_args(argv)
    try:
        with open(a.readme) as f:
            text = f.read()
    except OSError as e:
        print(f"readme-table: {e}", file=sys.stderr)
        return 2
    readme_dir = os.path.dirname(os.path.abspath(a.readme))
    if a.check:
        diff = check(text, readme_dir)
        print("\n".join(diff) if diff else f"{a.readme}: the measured-speed table matches its result file")
        return 1 if diff else 0
    if not a.results:
        ap.error("RESULTS.json is needed unless --check")
    source = os.path.relpath(os.path.abspath(a.results), readme_dir)
    try:
        new = block(ResultFile(a.results), source)
    except (OSError, ValueError) as e:
        print(f"readme-table: {e}", file=sys.stderr)
        return 2
    if not a.write:
        print(new)
        return 0
    try:
        text = replace(text, new)
    except ValueError as e:
        print(f"readme-table: {e}", file=sys.stderr)
        return 2
    with open(a.readme, "w") as f:
        f.write(text)
    print(f"wrote the measured-speed table of {a.readme} from {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
