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
