"""scripts/ncu_breakdown.py on a synthetic ncu --csv dump: the layer period, per-layer medians, once-a-token launches,
per-token category sums and the markdown, against values worked out by hand."""
import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from ncu_breakdown import align, breakdown, markdown, parse, split_name  # noqa: E402

NORM = "void rms_norm_f32<1024, 1, 0, 0>(const float *, float *, int, long, float)"
QUANT = "quantize_q8_1(const float *, void *, long, long, long, long, long, long)"
MMVQ = "void mul_mat_vec_q<96, 1, 0, 1, 0>(const void *, const void *, const int *, float *, unsigned int)"
OUT = "void mul_mat_vec_q<14, 1, 0, 0, 0>(const void *, const void *, const int *, float *, unsigned int)"
# 4 layers of norm -> quantize -> mat-vec, then the output mat-vec once; ns with thousands separators
LAYERS = [("4,000", "2,000", "10,000"), ("4,200", "2,000", "12,000"), ("4,100", "2,100", "11,000"),
          ("9,000", "2,000", "1,000")]
GRID = {NORM: ("(1024, 1, 1)", "(1, 1, 1)"), QUANT: ("(256, 1, 1)", "(10, 1, 1)"), MMVQ: ("(32, 4, 1)", "(1024, 1, 1)"),
        OUT: ("(32, 4, 1)", "(151936, 1, 1)")}


def dump() -> str:
    head = ["==PROF== Connected to process 1 (llama-bench)", "| model | size |", "| --- | ---: |",
            "==PROF== Disconnected from process 1"]
    rows = [["ID", "Kernel Name", "Block Size", "Grid Size", "Metric Name", "Metric Unit", "Metric Value"]]
    launches = [(k, ns) for lay in LAYERS for k, ns in zip((NORM, QUANT, MMVQ), lay)] + [(OUT, "216,832")]
    for i, (k, ns) in enumerate(launches):
        rows.append([str(i), k, *GRID[k], "gpu__time_duration.sum", "ns", ns])
    return "\n".join(head + [",".join(f'"{c}"' for c in r) for r in rows]) + "\n"


def test_split_name():
    assert split_name(MMVQ) == ("mul_mat_vec_q", "96, 1, 0, 1, 0")
    assert split_name(QUANT) == ("quantize_q8_1", "")
    assert split_name("void k<&op_add, A<B>>(int)") == ("k", "&op_add, A<B>")


def test_align_skips_inserted_launches_and_missing_kernels():
    assert align(list("abcabXYcabc"), list("abc")) == [0, 1, 2, 0, 1, None, None, 2, 0, 1, 2]
    assert align(list("abcacabc"), list("abc")) == [0, 1, 2, 0, 2, 0, 1, 2]
    assert align(list("cabcab"), list("abc")) == [2, 0, 1, 2, 0, 1]  # the window starts mid-layer


def test_breakdown_and_markdown(tmp_path):
    f = tmp_path / "ncu-synth-4l.csv"
    f.write_text(dump())
    launches = parse(f.read_text())
    assert len(launches) == 13 and launches[2] == {"name": "mul_mat_vec_q", "template": "96, 1, 0, 1, 0",
                                                   "grid": "(1024, 1, 1)", "block": "(32, 4, 1)", "ns": 10000.0}
    b = breakdown(launches, 36)
    assert b["period"] == 3
    # medians: norm (4000, 4100, 4200, 9000) -> 4150, quantize -> 2000, mat-vec (1000, 10000, 11000, 12000) -> 10500
    assert [(k["name"], k["median_ns"], k["n"]) for k in b["layer"]] == [
        ("rms_norm_f32", 4150, 4), ("quantize_q8_1", 2000, 4), ("mul_mat_vec_q", 10500, 4)]
    assert [(k["name"], k["role"], k["ns"]) for k in b["extra"]] == [("mul_mat_vec_q", "output", 216832)]
    # per token: 36 x median, plus the output mat-vec once
    assert b["cats"] == {"mat-vec": 36 * 10.5 + 216.832, "quantize activations": 36 * 2.0, "norm": 36 * 4.15,
                         "attention": 0.0, "rope/kv": 0.0, "other": 0.0}
    assert b["layers_us"] == 36 * 16.65 and b["extra_us"] == 216.832
    md = markdown({"synth-4l": b}, 36, "Test GPU").splitlines()
    assert md[0] == "# Decode kernel time per token, Test GPU (ncu, serialized kernel durations)"
    # total 378 + 216.832 + 72 + 149.4 = 816.232 µs; 1e6 / 816.232 = 1225.1 tok/s
    assert "| synth-4l | 595 | 72 | 149 | 0 | 0 | 0 | 816 | 599 | 217 | 3 | 1225 |" in md
    assert "| output | 216.8 |" in md and not any(line.startswith("| gate+up |") for line in md)
    i = md.index("## synth-4l: one layer (3 kernels)")
    assert md[i + 4:i + 7] == ["| 0 | rms_norm_f32 |  | (1, 1, 1) | 4.15 | 4 |",
                               "| 1 | quantize_q8_1 |  | (10, 1, 1) | 2.00 | 4 |",
                               "| 2 | mul_mat_vec_q |  | (1024, 1, 1) | 10.50 | 4 |"]
    assert md[i + 8] == "once a token: mul_mat_vec_q (output) (151936, 1, 1) 216.8"


def test_cli_writes_md_png_csv(tmp_path):
    f = tmp_path / "ncu-synth-4l.csv"
    f.write_text(dump())
    o = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "ncu_breakdown.py"), str(f), "--layers", "36",
                        "--card", "Test GPU", "--md", f"{o}.md", "--png", f"{o}.png", "--csv-out", f"{o}.csv"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert Path(f"{o}.md").read_text() == r.stdout and Path(f"{o}.png").stat().st_size > 1000
    assert list(csv.reader(open(f"{o}.csv"))) == [
        ["file", "pos", "kernel", "template", "grid", "block", "median_ns"],
        ["synth-4l", "0", "rms_norm_f32", "1024, 1, 0, 0", "(1, 1, 1)", "(1024, 1, 1)", "4150"],
        ["synth-4l", "1", "quantize_q8_1", "", "(10, 1, 1)", "(256, 1, 1)", "2000"],
        ["synth-4l", "2", "mul_mat_vec_q", "96, 1, 0, 1, 0", "(1024, 1, 1)", "(32, 4, 1)", "10500"],
        ["synth-4l", "token", "mul_mat_vec_q", "14, 1, 0, 0, 0", "(151936, 1, 1)", "(32, 4, 1)", "216832"]]
