"""Capture runners: the registry, the shared CLI, SGLang's acceptance counted one way, and the import graph."""
import ast
import logging
import subprocess
import sys
from pathlib import Path

from test_capture import small_capture
from test_sglang_adapter import sglang_output

from lib.capture import PREFIXES, load_capture
from lib.capture_runs import RUNNERS
from lib.capture_runs.cli import capture_cli
from lib.capture_runs.sglang import prompt_capture_from_output
from lib.config import resolve
from lib.engines.sglang_engine import SGLangEngine
from lib.files import ROOT
from lib.models import ModelPaths
from lib.sglang_support import spec_counters_from_meta
from lib.types import SpecCounters

SCRIPTS = {p.stem for p in ROOT.glob("*.py")}


def test_spec_counters_from_a_hand_written_meta_info():
    # 3 verifications of a 5-node tree (4 drafts each) emitted 10 tokens: 7 accepted drafts + 3 target tokens
    meta = {"completion_tokens": 10, "spec_verify_ct": 3, "spec_accept_length": 10 / 3}
    assert spec_counters_from_meta(meta, 5, emitted=10) == SpecCounters(3, 12, 7, [])
    assert spec_counters_from_meta({"spec_verify_ct": 2}, 4, emitted=6) == SpecCounters(2, 6, 4, [])
    assert spec_counters_from_meta({"completion_tokens": 8, "spec_verify_ct": 0}, 5, emitted=8) is None
    assert spec_counters_from_meta({"completion_tokens": 8}, 5, emitted=8) is None


class _Tokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def test_benchmark_engine_and_capture_count_sglang_acceptance_alike():
    """A chain of GAMMA_VALUE 3 is the tree of 4 nodes the capture run would ask for: the same counts."""
    from lib.types import Request
    output = sglang_output()
    engine = SGLangEngine(resolve(None, {"GAMMA_VALUE": "3"}), "speculative", ModelPaths(Path("t"), Path("d"), True))
    engine.tokenizer = _Tokenizer()
    record = engine._record(Request(0, "hi", [1], 4), output, [0.1] * 4, 0.0)
    capture = prompt_capture_from_output("hi", [1], output, 3, engine.num_draft_tokens)
    assert record.spec == SpecCounters(2, 6, 2, [])
    assert {k: capture.spec[k] for k in ("num_drafts", "draft_tokens", "accepted_tokens")} == \
        {"num_drafts": 2, "draft_tokens": 6, "accepted_tokens": 2}
    assert capture.spec["spec_accept_length"] == 2.0


def test_registry_names_are_the_capture_engines_and_workflow_choices():
    from workflow import build_parser
    assert set(RUNNERS) == set(PREFIXES)
    engine_flag = next(a for a in build_parser()._actions if a.dest == "engine1")
    assert tuple(engine_flag.choices) == tuple(RUNNERS)


def test_registry_imports_a_runner_only_when_it_runs():
    runners = tuple(f"lib.capture_runs.{name}" for name in RUNNERS)
    code = ("import sys, lib.capture_runs, workflow, run_vllm_config, run_sglang_config; "
            f"print(sorted(m for m in sys.modules if m.startswith({runners + ('vllm', 'sglang')!r})))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_capture_cli_runs_summarizes_and_saves(tmp_path, caplog):
    seen = []

    def fake_runner(cfg):
        seen.append(cfg)
        return small_capture()

    caplog.set_level(logging.INFO, logger="speclab")
    capture_cli(fake_runner, "doc", ["--config-name", "config1", "--save-results", "--output-dir", str(tmp_path)])
    assert seen[0].spec_num_iter == 5 and seen[0].name == "config1"
    out = "\n".join(caplog.messages)
    assert "reference config1: 1 prompts, 3 tokens in 0.00 s, 1 verification rounds, acceptance length 3.000" in out
    assert f"capture written: {tmp_path / 'logits_capture_config1.json'}" in out
    assert load_capture(tmp_path / "logits_capture_config1.json").prompts[0].token_ids == [5, 6, 7]


def lib_imports(folder: str) -> dict[str, set[str]]:
    """Module file -> the modules it imports (anywhere in the file, lazy imports included)."""
    found = {}
    for path in (ROOT / folder).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module)
        found[str(path.relative_to(ROOT))] = names
    return found


def test_lib_imports_no_script_and_edgecloud_no_engine():
    for path, names in lib_imports("lib").items():
        assert not {n.split(".")[0] for n in names} & SCRIPTS, path
    for path, names in lib_imports("lib/edgecloud").items():
        assert not any(n.startswith("lib.engines") for n in names), path
    for path, names in lib_imports("lib/capture_runs").items():
        assert not any(n.startswith(("lib.engines", "lib.edgecloud")) for n in names), path
