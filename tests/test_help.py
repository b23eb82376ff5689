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


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_python_without_the_projects_packages_gets_one_line(script):
    """Run by a Python with the standard library only (-S: no site-packages, as the system python3 on a fresh
    machine): the help needs nothing more, or one line names the missing package and the command that installs it."""
    done = subprocess.run([sys.executable, "-S", script, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    if done.returncode == 0:
        assert "usage:" in done.stdout
        return
    line, = done.stderr.strip().splitlines()
    assert done.returncode == 2 and line.startswith(f"error: {script} needs the package '"), line
    assert "scripts/ensure_env.sh" in line and sys.executable in line


def test_each_missing_package_is_traced_to_its_requirement_set():
    from lib.environment import missing_package_line, requirement_set
    assert [requirement_set(m) for m in ("torch", "yaml", "pynvml", "uvicorn", "llama_cpp", "prometheus_client",
                                         "compressed_tensors", "vllm", "sglang", "pytest", "no_such_package")] == [
        "core", "core", "core", "edge", "edge", "endpoint", "quant", "vllm", "sglang", "dev", None]
    assert '"$(scripts/ensure_env.sh edge)" start_edge.py' in missing_package_line("uvicorn", "start_edge.py")
    assert "requirements/" not in missing_package_line("no_such_package", "benchmark.py")


def test_a_missing_module_of_the_project_itself_keeps_its_traceback():
    """A lib module that is not there is a broken checkout, not a missing package: the traceback stays."""
    done = subprocess.run([sys.executable, "-S", "-c", "import lib.environment, sys; sys.argv = ['x.py']; "
                           "import lib.no_such_module"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" in done.stderr and "needs the package" not in done.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_imports_lib_environment_before_any_other_package(script):
    import ast
    tree = ast.parse((ROOT / script).read_text())
    first = next(names[0] for node in tree.body for names in [
        [a.name for a in node.names] if isinstance(node, ast.Import) else
        [node.module] if isinstance(node, ast.ImportFrom) and node.module != "__future__" else []]
        if names and names[0].split(".")[0] not in sys.stdlib_module_names)
    assert first == "lib.environment", f"{script}: its first import past the standard library is {first}"
