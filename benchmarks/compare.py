"""One result file against an older one, case by case and candidate by candidate.

A candidate is *slower* when its median grew by more than the runs' own spread: the larger of
its two interquartile ranges (old run, new run), and *faster* when it shrank by more than
that. Only the subject of a case (lrkernels) can make a regression; the baselines' changes are
shown beside it, because baselines that moved too point at the machine rather than the code.
Exit codes (used by `report --compare`): 0 no regression, 1 at least one, 2 nothing comparable.
"""

import dataclasses
from typing import List, Optional

from .resultfile import ResultFile, env_line, fmt_ms

OK, REGRESSION, NOTHING_COMPARABLE = 0, 1, 2


@dataclasses.dataclass
class Row:
    case: str
    candidate: str
    subject: bool
    old_ms: float
    new_ms: float
    spread_ms: float  # max(old IQR, new IQR)

    @property
    def ratio(self):
        return self.new_ms / self.old_ms if self.old_ms > 0 else float("inf")

    @property
    def verdict(self):
        d = self.new_ms - self.old_ms
        if d > self.spread_ms:
            return "slower"
        if -d > self.spread_ms:
            return "faster"
        return "same"

    @property
    def regression(self):
        return self.subject and self.verdict == "slower"


@dataclasses.dataclass
class Comparison:
    rows: List[Row]
    only_new: List[str]
    only_old: List[str]
    env_changes: List[str]

    @property
    def regressions(self):
        return [r for r in self.rows if r.regression]

    @property
    def exit_code(self):
        if not self.rows:
            return NOTHING_COMPARABLE
        return REGRESSION if self.regressions else OK


_ENV_KEYS = ("device", "device_name", "cpu_model", "cpu_isa", "cpu_threads", "torch", "cuda")


def _env_changes(new_env, old_env):
    out = []
    for k in _ENV_KEYS:
        if k in new_env and k in old_env and new_env[k] != old_env[k]:
            out.append(f"{k}: {old_env[k]} → {new_env[k]}")
    nb, ob = new_env.get("lrkernels_build"), old_env.get("lrkernels_build")
    if isinstance(nb, dict) and isinstance(ob, dict) and nb.get("cpu_capability") != ob.get("cpu_capability"):
        out.append(f"kernels' ISA: {ob.get('cpu_capability')} → {nb.get('cpu_capability')}")
    return out


def compare(new: ResultFile, old: ResultFile) -> Comparison:
    old_names = {c["name"] for c in old.cases}
    new_names = {c["name"] for c in new.cases}
    rows = []
    for case in new.cases:
        if case["name"] not in old_names:
            continue
        o = old.timed(case["name"])
        for cand, n in new.timed(case["name"]).items():
            if cand not in o:
                continue
            spread = max(n.get("iqr_ms") or 0.0, o[cand].get("iqr_ms") or 0.0)
            rows.append(Row(case["name"], cand, cand == case["subject"], o[cand]["median_ms"], n["median_ms"],
                            spread))
    return Comparison(rows, [c["name"] for c in new.cases if c["name"] not in old_names],
                      [c["name"] for c in old.cases if c["name"] not in new_names], _env_changes(new.env, old.env))


def markdown(cmp: Comparison, new: ResultFile, old: ResultFile, title_level="##") -> str:
    lines = [f"{title_level} Compared with `{old.path}`", "",
             f"Old run: {env_line(old.env)}.", "",
             "Slower / faster: the median moved by more than the larger interquartile range of the two "
             "runs. Only the subject (lrkernels) counts as a regression; baselines are shown for context.", ""]
    if cmp.env_changes:
        lines += ["**The environment differs**: " + "; ".join(cmp.env_changes) + ".", ""]
    if not cmp.rows:
        lines += ["No case in common: nothing to compare.", ""]
        return "\n".join(lines)
    regs = cmp.regressions
    lines += [f"**{len(regs)} regression(s)**" + (": " + "; ".join(f"{r.case}" for r in regs) if regs else "") + ".",
              "", "| case | candidate | old ms | new ms | new / old | spread ms | verdict |",
              "|---|---|---:|---:|---:|---:|---|"]
    for r in cmp.rows:
        v = "**REGRESSION**" if r.regression else r.verdict
        cand = f"**{r.candidate}**" if r.subject else r.candidate
        lines.append(f"| {r.case} | {cand} | {fmt_ms(r.old_ms)} | {fmt_ms(r.new_ms)} | {r.ratio:.3f} | "
                     f"{fmt_ms(r.spread_ms)} | {v} |")
    for label, names in (("Only in the new run", cmp.only_new), ("Only in the old run", cmp.only_old)):
        if names:
            lines += ["", f"{label}: " + "; ".join(names) + "."]
    lines.append("")
    return "\n".join(lines)


def summary(cmp: Comparison) -> Optional[str]:
    """One line for the terminal."""
    if not cmp.rows:
        return "compare: no case in common with the old result file"
    regs = cmp.regressions
    head = f"compare: {len(cmp.rows)} results in common, {len(regs)} regression(s)"
    return head + "".join(f"\n  REGRESSION {r.case} [{r.candidate}]: {fmt_ms(r.old_ms)} -> {fmt_ms(r.new_ms)} ms "
                          f"(x{r.ratio:.3f}, spread {fmt_ms(r.spread_ms)} ms)" for r in regs)
