"""Progress of a benchmark run: cases done / total, time elapsed, and an estimate of what
remains (the mean time per case so far times the cases left; cases of one family cost alike,
so the estimate is weighted by family once a family has a case done)."""

import time


def _hms(seconds):
    s = int(round(max(seconds, 0)))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    def __init__(self, families, clock=time.monotonic):
        """families: the family of every case to run, in order."""
        self.families = list(families)
        self.clock = clock
        self.t0 = clock()
        self.done = 0
        self.spent = {}  # family -> [seconds, cases]
        self._case_t0 = None

    @property
    def total(self):
        return len(self.families)

    def start_case(self):
        self._case_t0 = self.clock()

    def elapsed_s(self):
        return self.clock() - self.t0

    def end_case(self):
        """Marks the case done; returns the seconds it took."""
        fam = self.families[self.done]
        s = self.spent.setdefault(fam, [0.0, 0])
        took = self.clock() - (self._case_t0 if self._case_t0 is not None else self.t0)
        s[0] += took
        s[1] += 1
        self.done += 1
        return took

    def remaining_s(self):
        if not self.done:
            return None
        mean = sum(s for s, _ in self.spent.values()) / self.done
        rest = 0.0
        for fam in self.families[self.done:]:
            s, n = self.spent.get(fam, (0.0, 0))
            rest += s / n if n else mean
        return rest

    def line(self, label=""):
        """'[ 3/40] 7% elapsed 1m05s, about 20m10s left  <label>'"""
        el = self.clock() - self.t0
        rem = self.remaining_s()
        eta = "estimating time left" if rem is None else f"about {_hms(rem)} left"
        w = len(str(self.total))
        pct = 100 * self.done // max(self.total, 1)
        return f"[{self.done:>{w}}/{self.total}] {pct:3d}% elapsed {_hms(el)}, {eta}" + (f"  {label}" if label else "")
