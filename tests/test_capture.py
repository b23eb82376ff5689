"""Capture files: round trip, clear errors for truncated / mismatched files, safe legacy pickles, the CLI."""
import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lib.capture import SCHEMA, Capture, PromptCapture, load_capture, save_capture
from lib.comparison_config import ComparisonConfig, add_comparison_arguments, config_from_args
from lib.errors import UsageError
from lib.files import ROOT


def small_capture(engine="reference", tokens=(5, 6, 7)):
    n, k = len(tokens), 4
    ids = np.tile(np.arange(k, dtype=np.int64), (n, 1))
    ids[:, 0] = tokens
    ids[:, 1:] += 100
    logprobs = np.tile(np.array([-0.1, -2.0, -3.0, -4.0], dtype=np.float32), (n, 1))
    prompt = PromptCapture("hi", [1, 2], list(tokens), ids, logprobs, logprobs + 5.0, text="x",
                           step_round=[0, 1, 1], rounds=[{"accept_length": 3}], accept_lengths=[3],
                           spec={"num_drafts": 1, "draft_tokens": 4, "accepted_tokens": 2,
                                 "accepted_per_position": [1, 1, 0, 0]})
    return Capture(engine, "config1", {"spec_num_iter": 4}, {"target": "t"}, [prompt])


def test_round_trip(tmp_path):
    path = save_capture(small_capture(), tmp_path)
    assert path.name == "logits_capture_config1.json"
    assert json.loads(path.read_text())["schema"] == SCHEMA
    for name in (path, path.with_suffix(".safetensors"), path.with_suffix("")):
        back = load_capture(name)
        assert back.prompts[0].token_ids == [5, 6, 7]
        assert np.array_equal(back.prompts[0].topk_ids, small_capture().prompts[0].topk_ids)
        assert back.prompts[0].accept_lengths == [3]
        assert np.array_equal(back.prompts[0].topk_logits, small_capture().prompts[0].topk_logits)
        assert back.prompts[0].full_logits is None
        assert back.spec_totals() == {"num_drafts": 1, "draft_tokens": 4, "accepted_tokens": 2,
                                      "accepted_per_position": [1, 1, 0, 0]}
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, path.with_suffix(".safetensors").name]


def test_spec_totals_add_prompts_of_unequal_depth():
    capture = small_capture()
    capture.prompts.append(small_capture().prompts[0])
    capture.prompts[1].spec = {"num_drafts": 2, "accepted_tokens": 3, "accepted_per_position": [2, 1, 0, 0, 0, 1]}
    assert capture.spec_totals() == {"num_drafts": 3, "draft_tokens": 4, "accepted_tokens": 5,
                                     "accepted_per_position": [3, 2, 0, 0, 0, 1]}


def test_truncated_tensor_file_is_a_clear_error(tmp_path):
    path = save_capture(small_capture(), tmp_path)
    tensors = path.with_suffix(".safetensors")
    tensors.write_bytes(tensors.read_bytes()[:100])
    with pytest.raises(UsageError, match="truncated or corrupt"):
        load_capture(path)


def test_mismatched_files_are_a_clear_error(tmp_path):
    path = save_capture(small_capture(), tmp_path)
    meta = json.loads(path.read_text())
    meta["prompts"][0]["token_ids"].append(9)  # JSON now says 4 tokens, tensors hold 3 rows
    path.write_text(json.dumps(meta))
    with pytest.raises(UsageError, match="the files do not match"):
        load_capture(path)
    path.write_text(json.dumps({**meta, "schema": "something/9"}))
    with pytest.raises(UsageError, match="schema"):
        load_capture(path)
    path.write_text('{"schema": "speclab.capture/1", "prom')
    with pytest.raises(UsageError, match="not valid JSON"):
        load_capture(path)
    with pytest.raises(UsageError, match="no such file"):
        load_capture(tmp_path / "missing.json")
    path.unlink()  # the tensor file named, its JSON gone: the line names the file that is missing
    with pytest.raises(UsageError, match=re.escape(f"{path.with_suffix('.safetensors')}: {path}: no such file")):
        load_capture(path.with_suffix(".safetensors"))


class Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_malicious_pickle_does_not_execute(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"token_ids": [1], "logits": Payload(marker)}))
    with pytest.raises(UsageError, match="refused global"):
        load_capture(evil)
    assert not marker.exists()
    # and through the CLI: one line, exit 2, nothing executed
    os_payload = tmp_path / "os.pkl"
    os_payload.write_bytes(b"cos\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR.")
    proc = subprocess.run([sys.executable, "analyze_saved_data.py", "--data1", str(os_payload), "--data2",
                           str(os_payload), "--output-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "refused global os.system" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not marker.exists()


def test_legacy_pickle_with_plain_data_and_arrays_is_read(tmp_path):
    logits = np.random.default_rng(0).normal(size=(3, 50)).astype(np.float32)
    legacy = tmp_path / "logits_capture_old.pkl"
    legacy.write_bytes(pickle.dumps({"tokens": [int(x) for x in logits.argmax(1)], "logits": logits,
                                     "accept_lengths": [2, 1]}))
    capture = load_capture(legacy)
    assert capture.prompts[0].token_ids == [int(x) for x in logits.argmax(1)]
    assert capture.prompts[0].topk_ids[:, 0].tolist() == capture.prompts[0].token_ids
    legacy.write_bytes(pickle.dumps({"something": 1}))
    with pytest.raises(UsageError, match="needs 'token_ids'"):
        load_capture(legacy)


def parse(argv):
    import argparse
    return config_from_args(add_comparison_arguments(argparse.ArgumentParser()).parse_args(argv))


def test_comparison_config_presets_flags_and_topk_rule():
    assert ComparisonConfig().spec_num_iter == 5 and ComparisonConfig().spec_tree_size == 32
    assert ComparisonConfig().comparison_steps == 20 and ComparisonConfig().memory_limit == 0.7
    assert ComparisonConfig().chunk_length == 1024 and ComparisonConfig().prompt_file == "prompts/prompt_small.txt"
    one, two = parse(["--config-name", "config1"]), parse(["--config-name", "config2"])
    assert (one.spec_num_iter, one.spec_tree_size, one.get_topk_per_iter()) == (5, 32, 7)
    assert (two.spec_num_iter, two.spec_tree_size, two.get_topk_per_iter()) == (2, 12, 6)
    assert two.name == "config2"
    override = parse(["--config-name", "config2", "--spec-tree-size", "3"])
    assert (override.spec_num_iter, override.spec_tree_size, override.get_topk_per_iter()) == (2, 3, 1)
    for iters, size in ((1, 2), (3, 16), (5, 60), (7, 8)):
        k = ComparisonConfig(spec_num_iter=iters, spec_tree_size=size).get_topk_per_iter()
        assert iters * k + 1 >= size and (k == 1 or iters * (k - 1) + 1 < size)
    assert parse(["--spec-topk-per-iter", "3"]).get_topk_per_iter() == 3
    assert parse([]).name == "iter5_tree32"


@pytest.mark.parametrize("argv,message", [
    (["--config-name", "nope"], "no preset configs/nope.yaml"),
    (["--spec-tree-size", "1"], "--spec-tree-size=1"),
    (["--memory-limit", "1.5"], "--memory-limit=1.5"),
    (["--prompt-file", "missing.txt"], "no such file"),
])
def test_bad_comparison_flags(argv, message):
    with pytest.raises(UsageError, match=message):
        parse(argv)


def test_run_single_config_cli_saves_capture(tmp_path):
    proc = subprocess.run([sys.executable, "run_single_config.py", "--config-name", "config2", "--num-prompts", "1",
                           "--comparison-steps", "8", "--draft-type", "model", "--save-results", "--output-dir",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    capture = load_capture(tmp_path / "logits_capture_config2.json")
    assert len(capture.prompts[0].token_ids) == 8
    assert capture.config["topk_per_iter"] == 6 and capture.models["draft_type"] == "model"
    assert all(len(r["tree_tokens"]) == 12 for r in capture.prompts[0].rounds)


def damaged_tensors(tmp_path, **replace) -> Path:
    """small_capture saved, then prompt 0's tensors replaced (name -> array)."""
    from safetensors.numpy import load_file, save_file
    path = save_capture(small_capture(), tmp_path)
    tensors = load_file(str(path.with_suffix(".safetensors")))
    tensors.update({f"0.{name}": array for name, array in replace.items()})
    save_file(tensors, str(path.with_suffix(".safetensors")))
    return path


@pytest.mark.parametrize("replace,words", [
    ({"topk_ids": np.zeros((3, 0), np.int64), "topk_logprobs": np.zeros((3, 0), np.float32),
      "topk_logits": np.zeros((3, 0), np.float32)}, "topk_ids has shape [3, 0], expected [3, K] with K >= 1"),
    ({"topk_logits": np.zeros((3, 2), np.float32)}, "topk_ids and topk_logits differ in shape ([3, 4] and [3, 2])"),
    ({"full_logits": np.zeros((2, 500), np.float32)}, "full_logits has shape [2, 500], expected [3, K]"),
])
def test_tensors_that_do_not_fit_their_tokens_are_one_line(tmp_path, replace, words):
    path = damaged_tensors(tmp_path, **replace)
    with pytest.raises(UsageError) as exc:
        load_capture(path)
    assert str(exc.value).startswith(f"capture {path.with_suffix('.safetensors')}: prompt 0: {words}")
    assert str(exc.value).endswith("; the files do not match")


@pytest.mark.parametrize("entry,words", [
    ({"token_ids": ["a", "b"]}, "token_ids[0]: found text 'a'; accepted: a whole number >= 0"),
    ({"prompt_ids": 5}, "prompt_ids: found 5; accepted: a list"),
    ({"accept_lengths": ["x"]}, "accept_lengths[0]: found text 'x'; accepted: a whole number from 1 to 1025"),
    ({"accept_lengths": 3}, "accept_lengths: found 3; accepted: a list of whole numbers from 1 to 1025"),
    ({"logits": np.zeros((2, 0), np.float32)}, "legacy 'logits' have no columns"),
    ({"token_ids": [1, 9]}, "token id 9 is outside the 3 columns of its full_logits"),
])
def test_legacy_entries_go_through_the_capture_checks(tmp_path, entry, words):
    legacy = tmp_path / "old.pkl"
    legacy.write_bytes(pickle.dumps({"token_ids": [1, 2], "logits": np.zeros((2, 3), np.float32), **entry}))
    with pytest.raises(UsageError, match="^" + re.escape(f"capture {legacy}: {words}")):
        load_capture(legacy)


def test_legacy_numpy_and_tuple_fields_are_read_as_plain_numbers(tmp_path):
    legacy = tmp_path / "old.pkl"
    legacy.write_bytes(pickle.dumps([{"token_ids": np.array([2, 0]), "logits": np.eye(2, 3, dtype=np.float32),
                                      "prompt_ids": (np.int64(7),), "accept_lengths": [np.int32(2)]}] * 2))
    capture = load_capture(legacy)
    assert [p.token_ids for p in capture.prompts] == [[2, 0], [2, 0]]
    assert capture.prompts[1].prompt_ids == [7] and capture.prompts[1].accept_lengths == [2]
    legacy.write_bytes(pickle.dumps([{"token_ids": [1], "logits": [[0.0, 1.0]]}, {"tokens": [True], "logits": [[1]]}]))
    with pytest.raises(UsageError, match=re.escape(f"capture {legacy}: entry 1: token_ids[0]: found true")):
        load_capture(legacy)


def test_damaged_captures_end_the_cli_with_one_line(tmp_path):
    zero_k = damaged_tensors(tmp_path, topk_ids=np.zeros((3, 0), np.int64), topk_logprobs=np.zeros((3, 0), np.float32),
                             topk_logits=np.zeros((3, 0), np.float32))
    good = save_capture(small_capture(), tmp_path / "good")
    legacy = tmp_path / "old.pkl"
    legacy.write_bytes(pickle.dumps({"token_ids": ["a", "b"], "logits": np.zeros((2, 3), np.float32)}))
    for damaged in (zero_k, legacy):
        proc = subprocess.run([sys.executable, "analyze_saved_data.py", "--data1", str(damaged), "--data2", str(good),
                               "--output-dir", str(tmp_path / "out"), "--no-plots"], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert len(proc.stderr.strip().splitlines()) == 1 and f"capture {damaged.with_suffix('')}" in proc.stderr
