"""Every script's --help prints its usage and exits 0 (argparse formats help strings with %: one stray % in a
variable's help broke ./run_benchmark.sh --help once)."""
import subprocess
import sys

import pytest

from lib.files import ROOT

SCRIPTS = sorted(p.relative_to(ROOT).as_posix() for p in [*ROOT.glob("*.py"), *ROOT.glob("benchmarks/*.py")])


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_usage_and_exits_0(script):
    done = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout and "Traceback" not in done.stderr
