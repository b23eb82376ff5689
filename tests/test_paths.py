"""Defaults that name files shipped with the project resolve against the repository, so scripts run from any
folder; paths the user types stay relative to where they were typed."""
import subprocess
import sys
from pathlib import Path

from lib import config as C
from lib.files import ROOT

SCRIPTS = Path(__file__).resolve().parent.parent


def test_capture_script_finds_its_default_prompts_from_another_folder(tmp_path, tiny_models):
    r = subprocess.run([sys.executable, str(SCRIPTS / "run_single_config.py"), "--config-name", "config1",
                        "--comparison-steps", "2", "--num-prompts", "1"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "reference config1: 1 prompts, 2 tokens" in r.stdout


def test_edge_cloud_default_prompts_resolve_against_the_repository(tmp_path, monkeypatch):
    from lib.edgecloud.settings import load_config
    monkeypatch.chdir(tmp_path)
    prompts = Path(load_config(None)["experiments"]["prompts_file"])
    assert prompts.is_absolute() and prompts.is_file() and ROOT in prompts.parents
    user = tmp_path / "mine.yaml"
    user.write_text("experiments:\n  prompts_file: my_prompts.txt\n")
    assert load_config(str(user))["experiments"]["prompts_file"] == "my_prompts.txt"  # as typed


def test_benchmark_prompt_file_default_is_shipped_and_a_typed_path_is_relative_to_cwd(tmp_path, monkeypatch):
    from lib.workload import load_prompts
    monkeypatch.chdir(tmp_path)
    default = C.resolve(environ={})
    assert Path(default.prompt_file) == ROOT / "prompts" / "benchmark_prompts.txt"
    (tmp_path / "mine.txt").write_text("first prompt\nsecond prompt\n")
    typed = C.resolve(environ={"PROMPT_FILE": "mine.txt"})
    prompts, stats = load_prompts(typed, tokenizer=None)
    assert [p.text for p in prompts] == ["first prompt", "second prompt"] and stats.kept == 2
