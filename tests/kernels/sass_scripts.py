"""Running a `benchmarks/*_sass.py` script from a test: it compiles kernels for sm_90 on the CPU, which the
Triton interpreter's library functions cannot do, so it runs in a process without TRITON_INTERPRET."""

import os
import subprocess
import sys
from pathlib import Path


def run_sass_script(name: str, *args: str) -> str:
    """The stdout of `benchmarks/<name>` run with `args` (an AssertionError with its stderr if it fails)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    script = Path(__file__).resolve().parents[2] / "benchmarks" / name
    run = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout
