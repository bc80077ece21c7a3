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
