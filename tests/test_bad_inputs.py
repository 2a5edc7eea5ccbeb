"""Bad inputs for every op, each family run in a subprocess (tests/bad_inputs_worker.py): wrong
shapes, dtypes and devices, out-of-range ids and groupings, NaN/Inf values. A case passes when
the op raises the expected Python exception naming the argument (or, for NaN/Inf values,
returns and lets them propagate); a crash of the worker fails the case it was running and
every case after it, instead of killing the test run."""

import functools
import json
import os
import subprocess
import sys

import pytest

import bad_inputs_worker as worker

HERE = os.path.dirname(os.path.abspath(__file__))


@functools.lru_cache(maxsize=None)
def run_family(family):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([HERE, os.path.join(os.path.dirname(HERE), "python"),
                                         env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, os.path.join(HERE, "bad_inputs_worker.py"), family], capture_output=True,
                          text=True, timeout=600, env=env)
    results, last_start = {}, None
    for line in proc.stdout.splitlines():
        if line.startswith("START "):
            last_start = line[len("START "):]
        elif line.startswith("RESULT "):
            rec = json.loads(line[len("RESULT "):])
            results[rec["case"]] = rec
    done = "DONE" in proc.stdout.splitlines()
    return results, (None if done else (last_start, proc.returncode, proc.stderr[-2000:]))


CASES = [(fam, name) for fam, make in worker.FAMILIES.items() for name in make()]


@pytest.mark.parametrize("family,case", CASES, ids=[f"{f}: {c}" for f, c in CASES])
def test_bad_input(family, case):
    results, crash = run_family(family)
    if case not in results:
        start, rc, err = crash or (None, None, "")
        pytest.fail(f"the {family} worker died (exit code {rc}) while running case {start!r}; this case never ran.\n"
                    f"stderr tail:\n{err}")
    _fn, want, arg = worker.FAMILIES[family]()[case]
    rec = results[case]
    if want.startswith("returned"):
        assert rec["outcome"] == "returned", f"{case}: raised {rec.get('type')}: {rec.get('message')}"
        if want == "returned-nan":
            assert rec["finite"] is False, f"{case}: NaN/Inf in the input did not propagate to the output"
        return
    assert rec["outcome"] == "raised", f"{case}: returned without an error (want {want} naming {arg!r})"
    assert want in rec["mro"], f"{case}: raised {rec['type']} ({rec['message']}), want {want}"
    assert arg in rec["message"], f"{case}: the message does not name {arg!r}: {rec['message']}"
    if want != "Exception":
        assert rec["message"].startswith("lrkernels."), f"{case}: the message does not name the op: {rec['message']}"
