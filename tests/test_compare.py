"""Comparison of captures: self-compare, two reference configurations, the workflow and the analysis CLI."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from test_capture import small_capture

from lib.capture import load_capture
from lib.errors import UsageError
from lib.files import ROOT
from lib.logits_compare import acceptance_distribution, compare_captures


@pytest.fixture(scope="module")
def workflow_dir(tmp_path_factory):
    """config1 vs config2 of the reference engine, end to end through workflow.py."""
    out = tmp_path_factory.mktemp("wf")
    proc = subprocess.run([sys.executable, "workflow.py", "--num-prompts", "2", "--comparison-steps", "16",
                           "--results-dir", str(out), "--run-id", "run"], cwd=ROOT, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stderr
    assert "all tokens equal: True" in proc.stdout
    return out / "run"


def test_workflow_writes_one_folder(workflow_dir):
    names = {p.name for p in workflow_dir.iterdir()}
    assert {"logits_capture_config1.json", "logits_capture_config1.safetensors", "logits_capture_config2.json",
            "logits_capture_config2.safetensors", "detailed_logits_comparison_results.json",
            "logits_divergence_per_step.png", "acceptance_length_distribution.png", "workflow.json"} <= names
    assert json.loads((workflow_dir / "workflow.json").read_text())["all_tokens_equal"] is True


def test_two_configs_agree_on_tokens_and_differ_in_acceptance(workflow_dir):
    results = json.loads((workflow_dir / "detailed_logits_comparison_results.json").read_text())
    summary = results["summary"]
    assert summary["all_tokens_equal"] and summary["first_divergent_step"] == [None, None]
    assert summary["aligned"]["steps"] == 32 and summary["aligned"]["token_agreement"] == 1.0
    assert summary["aligned"]["max_abs_diff"] < 1e-3 and summary["aligned"]["mean_topk_overlap"] == 1.0
    acc = results["acceptance"]
    assert acc["data1"]["mean"] > acc["data2"]["mean"]  # depth 5 / 32 nodes accepts more than depth 2 / 12
    assert max(int(k) for k in acc["data2"]["histogram"]) <= 3  # at most 2 drafts + bonus per round
    assert acc["data1"]["histogram"] != acc["data2"]["histogram"]


def test_self_compare_has_zero_divergence(workflow_dir):
    capture = load_capture(workflow_dir / "logits_capture_config1.json")
    results = compare_captures(capture, capture)
    aligned = results["summary"]["aligned"]
    assert results["summary"]["all_tokens_equal"]
    assert aligned["mean_kl"] == 0 and aligned["max_kl"] == 0 and aligned["mean_js"] == pytest.approx(0, abs=1e-12)
    assert aligned["max_abs_diff"] == 0 and aligned["mean_topk_overlap"] == 1.0
    assert aligned["rank_a_in_b_top1_rate"] == 1.0
    assert results["acceptance"]["data1"] == results["acceptance"]["data2"]


def test_divergence_is_found_and_measured():
    a, b = small_capture(tokens=(5, 6, 7)), small_capture(tokens=(5, 8, 7))
    b.prompts[0].topk_logprobs[1] = [-0.5, -1.0, -3.0, -4.0]
    b.prompts[0].topk_logits = None  # only log-probs on one side -> differences of log-probs
    results = compare_captures(a, b)
    steps = results["prompts"][0]["steps"]
    assert results["prompts"][0]["first_divergent_step"] == 1
    assert results["summary"]["aligned"]["steps"] == 2 and results["abs_diff_of"] == "logprobs"
    assert steps[0]["kl"] == 0 and steps[1]["kl"] > 0 and steps[1]["js"] > 0
    assert steps[1]["topk_overlap"] == 0.75  # ids 6 and 8 differ, three shared
    assert steps[1]["rank_a_in_b"] == -1 and steps[1]["rank_b_in_a"] == -1
    assert math.isclose(steps[1]["max_abs_diff"], 1.0, rel_tol=1e-6)


def test_acceptance_from_per_position_counters():
    capture = small_capture()
    capture.prompts[0].accept_lengths = []
    capture.prompts[0].spec = {"num_drafts": 4, "accepted_tokens": 5, "draft_tokens": 12,
                               "accepted_per_position": [3, 2, 0]}
    dist = acceptance_distribution(capture)
    assert dist["histogram"] == {"1": 1, "2": 1, "3": 2, "4": 0} and dist["mean"] == 1 + 5 / 4


def test_different_prompts_are_refused():
    a, b = small_capture(), small_capture()
    b.prompts[0].prompt_ids = [9, 9]
    with pytest.raises(UsageError, match="different prompts"):
        compare_captures(a, b)
    b.prompts = b.prompts * 2
    with pytest.raises(UsageError, match="same prompt file"):
        compare_captures(a, b)


@pytest.mark.parametrize("field,value,words", [
    ("accept_lengths", "xyz", "prompts[0].accept_lengths: found text 'xyz'"),
    ("accept_lengths", [-5, 1e9], "prompts[0].accept_lengths[0]: -5 is out of range"),
    ("accept_lengths", [1e9], "prompts[0].accept_lengths[0]: found 1000000000.0"),
    ("token_ids", "567", "prompts[0].token_ids: found text '567'"),
    ("token_ids", [[5, 6], [7]], "prompts[0].token_ids[0]: found a list [5, 6]"),
    ("seconds", "fast", "prompts[0].seconds"),
    ("spec", {"num_drafts": "4"}, "prompts[0].spec.num_drafts: found text '4'"),
])
def test_capture_fields_of_the_wrong_type_are_named(tmp_path, field, value, words):
    from lib.capture import save_capture
    path = save_capture(small_capture(), tmp_path)
    meta = json.loads(path.read_text())
    meta["prompts"][0][field] = value
    path.write_text(json.dumps(meta))
    with pytest.raises(UsageError, match=f"^capture {path}: " + words.replace("[", r"\[").replace("(", r"\(")):
        load_capture(path)


def test_full_logits_of_different_vocabularies_are_one_line(tmp_path):
    import numpy as np

    from lib.capture import save_capture
    a, b = small_capture(), small_capture()
    a.prompts[0].full_logits = np.zeros((3, 200), dtype=np.float32)
    b.prompts[0].full_logits = np.zeros((3, 150), dtype=np.float32)
    b.prompts[0].topk_ids[:, 1:] -= 90  # every id inside b's 150 columns
    paths = [save_capture(c, tmp_path / name) for c, name in ((a, "a"), (b, "b"))]
    proc = subprocess.run([sys.executable, "analyze_saved_data.py", "--data1", str(paths[0]), "--data2",
                           str(paths[1]), "--output-dir", str(tmp_path / "out"), "--no-plots"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: captures {paths[0]} and {paths[1]}: full logits over 200 and 150 tokens; the captures come from "
        "models of different vocabularies (compare captures of one model)"]
    b.prompts[0].token_ids = [5, 6, 170]  # an id past its own full logits: the files do not match
    save_capture(b, tmp_path / "b")
    with pytest.raises(UsageError, match="token id 170 is outside the 150 columns"):
        load_capture(paths[1])


def test_results_and_plots_are_replaced_together_or_not_at_all(tmp_path, monkeypatch):
    import errno

    from matplotlib.figure import Figure

    from lib.logits_compare import ACCEPTANCE_PLOT, DIVERGENCE_PLOT, RESULTS_NAME, write_outputs
    first = compare_captures(small_capture(), small_capture(tokens=(5, 8, 7)))
    assert write_outputs(first, tmp_path) == [tmp_path / n for n in (RESULTS_NAME, DIVERGENCE_PLOT, ACCEPTANCE_PLOT)]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert before[DIVERGENCE_PLOT].startswith(b"\x89PNG") and before[ACCEPTANCE_PLOT].startswith(b"\x89PNG")
    second = compare_captures(small_capture(), small_capture(tokens=(5, 6, 7)))
    saved = Figure.savefig

    def full_disk_on_the_second_plot(fig, path, **kwargs):
        if Path(path).name.startswith(f".{ACCEPTANCE_PLOT}"):
            Path(path).write_bytes(b"\x89PNG half")
            raise OSError(errno.ENOSPC, "No space left on device")
        saved(fig, path, **kwargs)

    monkeypatch.setattr(Figure, "savefig", full_disk_on_the_second_plot)
    with pytest.raises(UsageError, match=f"^{tmp_path / ACCEPTANCE_PLOT}: cannot be written \\(No space left"):
        write_outputs(second, tmp_path)
    # the new results JSON and first plot were written, but none replaced the earlier comparison's files
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_comparison_without_plots_removes_an_earlier_ones_plots(tmp_path):
    from lib.logits_compare import ACCEPTANCE_PLOT, DIVERGENCE_PLOT, RESULTS_NAME, write_outputs
    results = compare_captures(small_capture(), small_capture(tokens=(5, 8, 7)))
    write_outputs(results, tmp_path)
    assert (tmp_path / DIVERGENCE_PLOT).is_file() and (tmp_path / ACCEPTANCE_PLOT).is_file()
    assert write_outputs(results, tmp_path, plots=False) == [tmp_path / RESULTS_NAME]
    assert sorted(p.name for p in tmp_path.iterdir()) == [RESULTS_NAME]


def test_an_output_in_the_way_is_refused_before_the_comparison(tmp_path):
    from lib.capture import save_capture
    from lib.logits_compare import ACCEPTANCE_PLOT, RESULTS_NAME
    capture = save_capture(small_capture(), tmp_path)
    for name in (RESULTS_NAME, ACCEPTANCE_PLOT):
        out = tmp_path / name.split(".")[0]
        (out / name).mkdir(parents=True)
        proc = subprocess.run([sys.executable, "analyze_saved_data.py", "--data1", str(capture), "--data2",
                               str(capture), "--output-dir", str(out)], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
            f"error: {out / name}: is a folder; expected the path of a file to write"], proc.stderr[-2000:]
        assert [p.name for p in out.iterdir()] == [name]
