"""Scaling curves out of a family's cases (harness.Case.sweep / params): the cases with the same
sweep name form a curve along params[sweep]; cases that differ in another param (dtype, rank,
...) make separate lines of that curve, labelled by what differs."""

from collections import OrderedDict


def sweeps_of(case):
    return [s.strip() for s in (case.get("sweep") or "").split(",") if s.strip()]


def curves(cases):
    """sweep name -> [(label, [(x, case), ...])], only lines of 2+ points; numeric x sorted,
    categorical x (a rank mix "8,16,64") in the order the benchmark lists its cases."""
    by_sweep = OrderedDict()
    for c in cases:
        params = c.get("params") or {}
        for s in sweeps_of(c):
            if s not in params:
                continue
            rest = tuple(sorted((k, str(v)) for k, v in params.items() if k != s))
            by_sweep.setdefault(s, OrderedDict()).setdefault(rest, []).append((params[s], c))
    out = OrderedDict()
    for s, lines in by_sweep.items():
        keep = [(rest, pts) for rest, pts in lines.items() if len({x for x, _ in pts}) >= 2]
        if not keep:
            continue
        varying = _varying([dict(rest) for rest, _ in keep])
        out[s] = [(", ".join(f"{k} {v}" for k, v in rest if k in varying),
                   sorted(pts, key=lambda p: p[0]) if all(isinstance(x, (int, float)) for x, _ in pts) else pts)
                  for rest, pts in keep]
    return out


def _varying(dicts):
    keys = set().union(*dicts) if dicts else set()
    return {k for k in keys if len({d.get(k) for d in dicts}) > 1}
