"""The benchmark report, --compare and the README's generated table, on small synthetic result
files (no benchmark is run, no timing is asserted)."""

import copy
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import compare, readme_table, report  # noqa: E402
from benchmarks.curves import curves  # noqa: E402
from benchmarks.progress import Progress  # noqa: E402
from benchmarks.resultfile import ResultFile  # noqa: E402

ENV = {"date": "2026-12-02T10:00:00+00:00", "device": "cpu", "device_name": "Test CPU 9000",
       "cpu_model": "Test CPU 9000",
       "cpu_isa": "AVX2", "machine": "x86_64", "cpu_threads": 2, "torch": "2.99.0", "cuda": None, "python": "3.11",
       "commit": "abc1234", "ceilings": {"copy_GBps": 20.0, "fp32_matmul_TFLOPs": 0.1},
       "lrkernels_build": {"cpu_capability": "avx2", "cpu_capability_detected": "avx2",
                           "cpu_capabilities_compiled": ["default", "avx2", "avx512"], "cpu_kernels": "auto"}}


def _case(name, family, baselines, targets=None, params=None, sweep="", headline=True):
    return {"name": name, "subject": "lrkernels", "baselines": baselines, "targets": targets or {}, "flops": 1e9,
            "bytes": 1e8, "family": family, "params": params or {}, "sweep": sweep, "headline": headline, "note": ""}


def _res(case, cand, ms, iqr=0.5, mem=10.0, gbps=None, skipped=""):
    return {"case": case, "candidate": cand, "median_ms": ms, "iqr_ms": iqr, "runs": 15, "peak_mem_mb": mem,
            "tflops": None, "gbps": gbps, "skipped": skipped}


def synthetic():
    cases, results = [], []
    for i, t in enumerate((256, 1024, 4096)):
        name = f"lora {t} tok r16 fwd+bwd"
        cases.append(_case(name, "lora", ["base_linear", "peft_lora"],
                           {"base_linear": 1.1} if t == 4096 else None, {"tokens": t, "rank": 16}, "tokens,rank",
                           headline=t == 4096))
        results += [_res(name, "lrkernels", 1.0 * t / 64, gbps=5.0 + i), _res(name, "base_linear", 0.95 * t / 64),
                    _res(name, "peft_lora", 1.4 * t / 64, mem=40.0)]
    name = "lora 4096 tok r64 fwd+bwd"
    cases.append(_case(name, "lora", ["base_linear", "peft_lora"], None, {"tokens": 4096, "rank": 64}, "rank",
                       headline=False))
    results += [_res(name, "lrkernels", 70.0), _res(name, "base_linear", 60.0), _res(name, "peft_lora", 90.0)]
    name = "galore 2048x2048 r128 step"
    cases.append(_case(name, "galore", ["galore-torch", "torch-adamw"], {"galore-torch": 0.75}))
    results += [_res(name, "lrkernels", 12.0, mem=2.0), _res(name, "galore-torch", 24.0, mem=35.0),
                _res(name, "torch-adamw", float("nan"), mem=None, skipped="not installed")]
    return {"environment": ENV, "cases": cases, "results": results}


def _write(tmp_path, name, data):
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return str(p)


def test_report_renders_plots_linked_from_markdown(tmp_path):
    pytest.importorskip("matplotlib")
    path = _write(tmp_path, "run.json", synthetic())
    out = tmp_path / "rep"
    assert report.main([path, "--out", str(out)]) == 0
    md = (out / "README.md").read_text()
    pngs = sorted(out.glob("*.png"))
    names = {p.name for p in pngs}
    # per family: times (+ memory) and ratios; lora: scaling in tokens and in rank; ceilings
    for want in ("lora-times.png", "lora-ratios.png", "lora-scaling-tokens.png", "lora-scaling-rank.png",
                 "lora-ceilings.png", "galore-times.png", "galore-ratios.png"):
        assert want in names, (want, names)
    for p in pngs:
        assert p.stat().st_size > 1000, p
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({p.name})" in md, f"{p.name} is not linked from the report"
    linked = set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md))
    assert linked == names
    for fact in ("Test CPU 9000", "AVX2", "| threads | 2 |", "torch 2.99.0", "abc1234", "device cpu"):
        assert fact in md, fact
    assert "NOT met" not in md and "met" in md  # 1.0·64/0.95·64 = 1.05 <= 1.1; 0.5 <= 0.75


def test_report_without_matplotlib_writes_tables_and_says_so(tmp_path):
    path = _write(tmp_path, "run.json", synthetic())
    out = tmp_path / "rep"
    code = ("import sys; sys.modules['matplotlib'] = None; from benchmarks import report; "
            f"sys.exit(report.main([{path!r}, '--out', {str(out)!r}]))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "matplotlib is not installed" in p.stderr
    md = (out / "README.md").read_text()
    assert "No plots" in md and "| lora 4096 tok r16 fwd+bwd | **lrkernels** |" in md
    assert not list(out.glob("*.png"))


def _slower(data, case, cand, factor):
    d = copy.deepcopy(data)
    for r in d["results"]:
        if r["case"] == case and r["candidate"] == cand:
            r["median_ms"] *= factor
    return d


def test_compare_flags_a_regression_and_passes_an_unchanged_file(tmp_path):
    old = synthetic()
    old_p = _write(tmp_path, "old.json", old)
    same_p = _write(tmp_path, "same.json", old)
    # 16 ms -> 24 ms with IQRs of 0.5 ms: far beyond the spread
    bad_p = _write(tmp_path, "bad.json", _slower(old, "lora 1024 tok r16 fwd+bwd", "lrkernels", 1.5))
    # within the spread (12 ms + 0.3 ms < IQR 0.5 ms): not a regression
    noise_p = _write(tmp_path, "noise.json", _slower(old, "galore 2048x2048 r128 step", "lrkernels", 1.025))
    # only a baseline slowed: context, not a regression
    base_p = _write(tmp_path, "base.json", _slower(old, "galore 2048x2048 r128 step", "galore-torch", 2.0))
    other = synthetic()
    for c in other["cases"]:
        c["name"] += " (renamed)"
    for r in other["results"]:
        r["case"] += " (renamed)"
    other_p = _write(tmp_path, "other.json", other)

    assert report.main([same_p, "--compare", old_p, "--no-plots", "--out", str(tmp_path / "r0")]) == compare.OK
    assert report.main([noise_p, "--compare", old_p, "--no-plots", "--out", str(tmp_path / "r1")]) == compare.OK
    assert report.main([base_p, "--compare", old_p, "--no-plots", "--out", str(tmp_path / "r2")]) == compare.OK
    assert report.main([bad_p, "--compare", old_p, "--no-plots", "--out", str(tmp_path / "r3")]) == compare.REGRESSION
    assert report.main([other_p, "--compare", old_p, "--no-plots", "--out",
                        str(tmp_path / "r4")]) == compare.NOTHING_COMPARABLE
    md = (tmp_path / "r3" / "README.md").read_text()
    assert "**1 regression(s)**" in md and "**REGRESSION**" in md
    c = compare.compare(ResultFile(bad_p), ResultFile(old_p))
    assert [(r.case, r.candidate) for r in c.regressions] == [("lora 1024 tok r16 fwd+bwd", "lrkernels")]
    # the exit code reaches a shell through the CLI
    p = subprocess.run([sys.executable, "-m", "benchmarks", "report", bad_p, "--compare", old_p, "--no-plots",
                        "--out", str(tmp_path / "r5")], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 1 and "REGRESSION lora 1024 tok" in p.stdout, p.stdout + p.stderr
    missing = subprocess.run([sys.executable, "-m", "benchmarks", "report", str(tmp_path / "nope.json"),
                              "--no-plots"], cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode == 2


def test_compare_names_a_changed_environment(tmp_path):
    old = synthetic()
    new = copy.deepcopy(old)
    new["environment"]["lrkernels_build"]["cpu_capability"] = "avx512"
    new["environment"]["cpu_threads"] = 16
    c = compare.compare(ResultFile(_write(tmp_path, "n.json", new)), ResultFile(_write(tmp_path, "o.json", old)))
    assert any("cpu_threads" in e for e in c.env_changes) and any("ISA" in e for e in c.env_changes)


def test_readme_table_matches_its_result_file():
    text = (ROOT / "README.md").read_text()
    diff = readme_table.check(text, str(ROOT))
    assert not diff, ("README's measured-speed table differs from its result file; regenerate it with "
                      "`python -m benchmarks readme-table RESULTS.json --write`:\n" + "\n".join(diff))


def test_readme_table_check_catches_a_hand_edited_figure(tmp_path):
    _write(tmp_path, "run.json", synthetic())
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- BEGIN bench-table source=old (generated) -->\n<!-- END bench-table -->\n\nmore\n")
    assert readme_table.main([str(tmp_path / "run.json"), "--write", "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.endswith("\n\nmore\n") and "source=run.json" in text
    assert "| lora: lora 4096 tok r16 fwd+bwd | 64.0 ms, 10.0 MB |" in text
    assert "lora 256 tok" not in text  # a curve's extra point is not a headline row
    assert readme_table.check(text, str(tmp_path)) == []
    assert readme_table.main(["--check", "--readme", str(readme)]) == 0
    edited = text.replace("64.0 ms, 10.0 MB", "54.0 ms, 10.0 MB", 1)
    assert edited != text
    readme.write_text(edited)
    diff = readme_table.check(edited, str(tmp_path))
    assert any(line.startswith("-") and "54.0 ms" in line for line in diff), diff
    assert readme_table.main(["--check", "--readme", str(readme)]) == 1
    # the file changing under an unchanged table is caught the same way
    readme.write_text(text)
    _write(tmp_path, "run.json", _slower(synthetic(), "galore 2048x2048 r128 step", "galore-torch", 1.1))
    assert readme_table.check(text, str(tmp_path)) != []


def test_curves_group_by_sweep_and_the_other_params():
    rf_cases = synthetic()["cases"]
    cv = curves(rf_cases)
    assert list(cv) == ["tokens", "rank"]
    (label, pts), = cv["tokens"]
    assert [x for x, _ in pts] == [256, 1024, 4096]
    (label, pts), = cv["rank"]
    assert [x for x, _ in pts] == [16, 64]


def test_progress_counts_and_estimates():
    now = [0.0]
    p = Progress(["a", "a", "b", "b"], clock=lambda: now[0])
    assert p.line().startswith("[0/4]") and "estimating" in p.line()
    for dt in (10.0, 30.0):
        p.start_case()
        now[0] += dt
        p.end_case()
    line = p.line()
    assert line.startswith("[2/4]  50% elapsed 0m40s") and "about 0m40s left" in line, line
    p.start_case()
    now[0] += 5.0
    p.end_case()  # family b costs 5 s a case now
    assert p.remaining_s() == pytest.approx(5.0)


def test_flop_ceiling_matches_the_case_precision():
    from benchmarks.plots import flop_ceiling_key
    both = {"copy_GBps": 20.0, "fp32_matmul_TFLOPs": 0.1, "bf16_matmul_TFLOPs": 0.4}
    assert flop_ceiling_key("lora 4096 tok r16 fp32 fwd+bwd", both) == "fp32_matmul_TFLOPs"
    # a bf16 base with fp32 adapters runs its GEMMs in bf16
    assert flop_ceiling_key("lora 4096 tok r16 bf16 (fp32 adapters) fwd+bwd", both) == "bf16_matmul_TFLOPs"
    assert flop_ceiling_key("issue 2048x2048 r128 float32 GaLoreAdamW step", both) == "fp32_matmul_TFLOPs"
    # no ceiling measured for the precision, or none named: no FLOP fraction at all
    assert flop_ceiling_key("lora 4096 tok r16 bf16 fwd", {"fp32_matmul_TFLOPs": 0.1}) is None
    assert flop_ceiling_key("decode Sk4096", both) is None
