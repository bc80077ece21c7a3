"""The GPU-machine scripts are run only there, in sessions with 30 minutes of device time: a syntax error found there
costs a session. Every shell script under scripts/ must parse."""
import subprocess
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "scripts").glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_shell_script_parses(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_shapes_script_refuses_without_its_tool(tmp_path):
    """device_shapes.sh make names the missing synth_gguf.py and how to carry it, and exits non-zero."""
    sh = next(s for s in SCRIPTS if s.name == "device_shapes.sh")
    r = subprocess.run(["bash", str(sh), "make", "src.gguf", str(tmp_path), str(tmp_path)], capture_output=True,
                       text=True, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert r.returncode != 0 and "synth_gguf.py" in r.stdout and ".device/tools" in r.stdout


def test_method_table_joins_rows_and_manifests_of_a_real_run():
    """scripts/method_table.py on the committed twelfth/thirteenth qwen15 results: llama.cpp rows get their
    checkpoint's quantize time and peak memory, a distilled checkpoint its init's time plus its own."""
    import json
    import sys
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "scripts"))
    from method_table import ckpt_cells, load_manifests, table
    res = root / "docs" / "results"
    md = table(json.loads((res / "gguf-qwen15-run12-h200x2.json").read_text()),
               load_manifests(res, "qwen15-", "-run12-h200x2"))
    rows = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines()[2:]}
    assert "| 0.1431 / 80.1 / 22.14 | 0.1577 | 0.1634 | 101 | 9.82 |" in rows["ours gptq-g128: gptq W3G128"]
    assert rows["IQ3_S+imat"].endswith("|  |  |  |")  # a stock file has no manifest
    assert [line.split(" | ")[1] for line in md.splitlines()[2:]] == ["792", "792", "821", "823", "836", "3395"]
    mans = load_manifests(res, "qwen15-", "-run13-h200x2")
    assert ckpt_cells(mans["kd-gptq-q3k"], mans) == ["171 + 303", "9.90 → 11.70",
                                                      "0.0666 → 0.0563 (best step 200 of 221)"]


def test_speed_table_on_a_real_run():
    """scripts/speed_table.py on the thirteenth qwen15 run's llama-bench and batched-bench results: × F16 and the
    achieved bandwidth from the file's bytes, the copy roof from the mat-vec microbenchmark's record."""
    import json
    import sys
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "scripts"))
    from speed_table import batched_table, bench_rows, roof_gbps, table
    res = root / "docs" / "results"
    files = bench_rows(json.loads((res / "llama-bench-qwen15-run13-h200x2.json").read_text()))
    assert files["rtn-g128.gguf"]["tg"] == pytest.approx(582.3, abs=0.1) and files["qwen15-F16.gguf"]["pp"] > 40000
    roof = roof_gbps(res / "cuda-mmvq-h200.jsonl")
    assert 3000 < roof < 5000
    md = table(files, roof).splitlines()
    f16 = next(line for line in md if line.startswith("| qwen15-F16.gguf"))
    assert "| 1.00 |" in f16 and f"| {3554465792 * 429.1 / 1e9:.0f} |" in f16  # bytes x tok/s
    ours = next(line for line in md if line.startswith("| rtn-g128.gguf"))
    assert f"| {582.3 / 429.1:.2f} |" in ours
    rows = [json.loads(x) for x in (res / "batched-bench-qwen15-run13-h200x2.jsonl").read_text().splitlines()]
    bt = batched_table(rows)
    assert "| rtn-g128.gguf (batch 2..8 kernel off) | 596 | 950 | 1400 | 2471 |" in bt  # the switch's rows apart
    assert "| rtn-g128.gguf | 561 | 850 | 1437 | 2259 |" in bt
