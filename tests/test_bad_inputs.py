"""Hostile input, the way a user meets it: every script ends with exit 2 and one line on stderr that names the input
(and what is accepted), never a traceback. One test per class of input; each case is a sample of its class."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lib.files import ROOT

pytestmark = pytest.mark.timeout(300)


def run(args, env=None, timeout=120) -> subprocess.CompletedProcess:
    full = {**os.environ, "ENABLE_GPU_MONITOR": "false", "NUM_PROMPTS": "2", "GENERATION_LENGTH": "8", **(env or {})}
    return subprocess.run(args, cwd=ROOT, env=full, capture_output=True, text=True, timeout=timeout)


def assert_one_line(proc, *words):
    """Exit 2, no traceback, and stderr's one line names the input (each of `words` in it)."""
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr[-3000:])
    assert lines[0].startswith("error: ") and all(w in lines[0] for w in words), lines[0]


def benchmark(**env):
    return run([sys.executable, "benchmark.py"], {k: str(v) for k, v in env.items()})


# ---------------------------------------------------------------------------------------- broken model folders

def _break(folder: Path, how: str):
    config = folder / "config.json"
    weights = folder / "model.safetensors"
    if how == "config not JSON":
        config.write_text("{bad")
    elif how == "config a list":
        config.write_text("[1, 2]")
    elif how == "config with a 5000-digit integer":  # past Python's int digit limit: a ValueError of its own
        config.write_text(json.dumps({**json.loads(config.read_text()), "vocab_size": 1})[:-1] + ', "x": '
                          + "9" * 5000 + "}")
    elif how == "config with NaN":
        config.write_text(json.dumps({**json.loads(config.read_text()), "rope_theta": float("nan")}))
    elif how == "config without model_type":
        config.write_text("{}")
    elif how == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "5-byte weights":
        weights.write_bytes(b"\x00" * 5)
    elif how == "vocab_size not the weights'":
        config.write_text(json.dumps({**json.loads(config.read_text()), "vocab_size": 999}))
    elif how == "vocab_size as text":
        config.write_text(json.dumps({**json.loads(config.read_text()), "vocab_size": "732"}))
    elif how == "hidden_size not the weights'":
        config.write_text(json.dumps({**json.loads(config.read_text()), "hidden_size": 96}))
    elif how == "bin only":
        weights.unlink()
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x04junk")
    elif how == "no weights":
        weights.unlink()
    elif how == "missing shard":
        index = '{"weight_map": {"lm_head.weight": "model-2.safetensors"}}'
        (folder / "model.safetensors.index.json").write_text(index)
    elif how == "no tokenizer":
        (folder / "tokenizer.json").unlink()
    elif how == "broken tokenizer":
        (folder / "tokenizer.json").write_text('{"model": ')
    elif how == "unknown model_type":
        config.write_text(json.dumps({**json.loads(config.read_text()), "model_type": "no_such_model"}))


BROKEN = {"config not JSON": "config.json is not valid JSON", "config a list": "config.json holds a list",
          "config without model_type": "config.json has no model_type",
          "config with a 5000-digit integer": "config.json is not valid JSON",
          "config with NaN": "config.json is not valid JSON (NaN is not a JSON number)",
          "truncated weights": "model.safetensors is not a complete safetensors file",
          "5-byte weights": "model.safetensors is not a complete safetensors file",
          "vocab_size not the weights'": "config.json says vocab_size 999 but the weights' embedding has 732",
          "vocab_size as text": "config.json is not a llama config transformers reads",
          "hidden_size not the weights'": "config.json says hidden_size 96 but the weights' embedding has 64",
          "bin only": "safetensors weights only", "no weights": "no weights in the folder",
          "missing shard": "names 1 shard(s) not in the folder, e.g. model-2.safetensors",
          "unknown model_type": "model_type 'no_such_model' is not one this transformers version knows"}
TARGETS = {"no tokenizer": "no tokenizer in the folder", "broken tokenizer": "the tokenizer cannot be loaded"}


@pytest.fixture(scope="module")
def broken_folders(tiny_models, tmp_path_factory):
    """Copies of the tiny draft and target, each broken one way."""
    root = tmp_path_factory.mktemp("broken")
    out = {}
    for how in [*BROKEN, *TARGETS]:
        folder = root / how.replace(" ", "_").replace("'", "")
        shutil.copytree(tiny_models.target if how in TARGETS else tiny_models.draft, folder)
        _break(folder, how)
        out[how] = folder
    return out


def test_broken_model_folders_are_one_line_before_any_mode(tiny_models, broken_folders, tmp_path):
    for how, words in BROKEN.items():
        folder = broken_folders[how]
        assert_one_line(benchmark(TARGET_MODEL=tiny_models.target, DRAFTER_MODEL=folder, RESULTS_DIR=tmp_path),
                        f"DRAFTER_MODEL={folder}: ", words)
    assert not list(tmp_path.iterdir()), "refused before a run folder was made"
    for how, words in TARGETS.items():
        folder = broken_folders[how]
        assert_one_line(benchmark(TARGET_MODEL=folder, DRAFTER_MODEL=tiny_models.draft), f"TARGET_MODEL={folder}: ",
                        words)
    # the same check in every script that takes a model folder
    folder = broken_folders["truncated weights"]
    assert_one_line(run([sys.executable, "run_single_config.py", "--model-path", str(folder), "--draft-model-path",
                         str(tiny_models.draft)]), f"--model-path={folder}", "not a complete safetensors file")
    for script in ("run_single_config.py", "run_vllm_config.py", "run_sglang_config.py"):  # a draft is sniffed
        assert_one_line(run([sys.executable, script, "--model-path", str(tiny_models.target), "--draft-model-path",
                             str(folder)]), f"--draft-model-path={folder}", "not a complete safetensors file")
    cloud = tmp_path / "cloud.yaml"
    cloud.write_text(f"cloud:\n  model:\n    path: {broken_folders['config a list']}\n")
    assert_one_line(run([sys.executable, "start_cloud.py", "--config", str(cloud)]), "cloud.model.path=",
                    "config.json holds a list")
    assert_one_line(run([sys.executable, "run_mixed_precision.py", "--base", str(broken_folders["bin only"])]),
                    "--base=", "safetensors weights only")


def test_a_mixed_precision_config_is_checked_before_the_first_mode(tmp_path):
    missing = tmp_path / "nope.yaml"
    proc = benchmark(COMPARE_MODES="llamacpp:target hf:target", MIXED_PRECISION_CONFIG=missing, RESULTS_DIR=tmp_path)
    assert_one_line(proc, str(missing))
    assert not list(tmp_path.glob("*/requests_*.jsonl")), "no mode ran"


def test_a_cache_folder_that_cannot_be_one_is_one_line(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_one_line(benchmark(SPECLAB_CACHE_DIR=blocker), f"SPECLAB_CACHE_DIR={blocker}: ", "is a file, not a folder")
    from lib.models import cache_root
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("SPECLAB_CACHE_DIR", " ")  # empty means unset, not the current folder
    assert cache_root() == tmp_path / ".cache" / "speclab"


def test_gguf_inputs_are_one_line(tiny_models, broken_folders, tmp_path):
    edge = tmp_path / "edge.yaml"
    edge.write_text("edge:\n  model:\n    path: /bin/ls\n")
    assert_one_line(run([sys.executable, "start_edge.py", "--config", str(edge)]), "edge.model.path=/bin/ls",
                    "not a GGUF file")
    edge.write_text(f"edge:\n  model:\n    hf_path: {broken_folders['bin only']}\n")  # the GGUF export's input
    assert_one_line(run([sys.executable, "start_edge.py", "--config", str(edge)]), "edge.model.hf_path=",
                    "safetensors weights only")
    from lib.gguf_export import ensure_gguf
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(ensure_gguf(tiny_models.draft).read_bytes()[:50_000])  # GGUF's magic, half a file
    edge.write_text(f"edge:\n  model:\n    path: {truncated}\n")
    assert_one_line(run([sys.executable, "start_edge.py", "--config", str(edge)]), f"edge model {truncated}: ",
                    "llama.cpp cannot load this GGUF file")


def test_cached_gguf_that_fails_to_load_is_one_line(tiny_models, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_models.root, cache / tiny_models.root.name)
    env = {"SPECLAB_CACHE_DIR": cache, "INFERENCE_ENGINE": "llamacpp", "INFERENCE_METHOD": "target",
           "NUM_PROMPTS": 1, "GENERATION_LENGTH": 4, "RESULTS_DIR": tmp_path / "r"}
    assert benchmark(**env).returncode == 0  # writes the cached export
    export, = cache.glob("gguf-*/model-f32.gguf")
    export.write_bytes(export.read_bytes()[:50_000])
    assert_one_line(benchmark(**env), f"TARGET_MODEL's GGUF export {export}: llama.cpp cannot load this GGUF file",
                    "delete its folder")


# ------------------------------------------------------------------------------ prompts longer than the context

@pytest.mark.parametrize("engine,limit", [("hf", "2048 (TARGET_MODEL's max_position_embeddings)"),
                                          ("llamacpp", "1040 (llama.cpp's n_ctx"),
                                          ("vllm", "2048 (VLLM_MAX_MODEL_LEN)")])
def test_prompt_longer_than_the_context_names_the_request(tmp_path, engine, limit):
    prompts = tmp_path / "long.txt"
    prompts.write_text("a short prompt\n" + "the cat sat on the mat " * 300 + "\n")
    proc = benchmark(PROMPT_FILE=prompts, NUM_PROMPTS=2, INFERENCE_ENGINE=engine, RESULTS_DIR=tmp_path / "r")
    assert_one_line(proc, "request ", "GENERATION_LENGTH=8", f"more than {engine}:", f"context of {limit}")


# ------------------------------------------------------------------------------------------- prompt files

def test_a_dataset_past_the_context_names_where_its_new_tokens_come_from(tmp_path):
    data = tmp_path / "long.jsonl"
    data.write_text('{"prompt": "a cat", "output_tokens": 99999}\n')
    proc = benchmark(DATASET="custom", DATASET_PATH=data, NUM_PROMPTS=1, RESULTS_DIR=tmp_path / "r")
    assert_one_line(proc, "request 0: ", "+ 99999 new tokens (each its output_tokens, else GENERATION_LENGTH=8)")


def test_paths_that_are_not_utf8_are_one_line(tmp_path):
    odd = str(tmp_path) + "/out\udcff"  # the byte 0xff as Python's file system encoding delivers it
    assert_one_line(run([sys.executable, "run_single_config.py", "--save-results", "--output-dir", odd]),
                    "--output-dir=", "the path is not UTF-8 text")
    assert_one_line(benchmark(RESULTS_DIR=odd), "RESULTS_DIR=", "not UTF-8 text")


def test_unreadable_prompt_and_sharegpt_files_are_one_line(tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"caf\xe9 au lait\n")
    for path in ("/bin/ls", latin1):
        assert_one_line(benchmark(PROMPT_FILE=path), f"PROMPT_FILE={path}: not UTF-8 text")
    deep, array_expected, binary = (tmp_path / name for name in ("deep", "dict", "binary"))
    for folder in (deep, array_expected, binary):
        folder.mkdir()
    (deep / "sharegpt_gpt4.jsonl").write_text('{"conversations": []}\n{"c": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    (array_expected / "sharegpt_gpt4.json").write_text('{"conversations": []}')
    (binary / "sharegpt_gpt4.jsonl").write_bytes(Path("/bin/ls").read_bytes()[:4096])
    assert_one_line(benchmark(SHAREGPT_DIR=deep), f"{deep / 'sharegpt_gpt4.jsonl'}, line 2: JSON nested too deeply")
    assert_one_line(benchmark(SHAREGPT_DIR=array_expected), "sharegpt_gpt4.json: holds a JSON object; expected an "
                    "array of conversations")
    assert_one_line(benchmark(SHAREGPT_DIR=binary), "sharegpt_gpt4.jsonl: not UTF-8 text")
    for name, data in (("deep", ("[" * 100_000 + "]" * 100_000).encode()), ("binary", b"\xd0\xff\x00")):
        run_folder = tmp_path / "results" / name
        run_folder.mkdir(parents=True)
        (run_folder / "benchmark_results.json").write_bytes(data)
        assert_one_line(run([sys.executable, "analyze.py", str(run_folder)]),
                        f"{run_folder / 'benchmark_results.json'}: not a SpecLab result file")


def test_devices_and_pipes_given_as_input_files_are_one_line_not_a_hang(tmp_path):
    """A read of a device or a pipe may never end (/dev/zero, a FIFO nobody writes): refused before it is opened."""
    fifo = tmp_path / "prompts.fifo"
    os.mkfifo(fifo)
    assert_one_line(benchmark(PROMPT_FILE="/dev/zero"), "PROMPT_FILE=/dev/zero: is not a regular file")
    assert_one_line(benchmark(DATASET="custom", DATASET_PATH=fifo), f"DATASET_PATH={fifo}: is not a regular file")
    assert_one_line(run([sys.executable, "analyze_saved_data.py", "--data1", str(fifo), "--data2", "/dev/null"]),
                    f"capture {fifo}: is not a regular file")
    assert_one_line(benchmark(SHAREGPT_DIR="/dev/null"), "SHAREGPT_DIR=/dev/null: is not a folder")


# ------------------------------------------------------------------------------- output paths under a file

def test_output_paths_under_a_file_are_refused_before_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    under = blocker / "out"
    assert_one_line(benchmark(RESULTS_DIR=under), f"RESULTS_DIR={under}", "is a file, not a folder")
    assert_one_line(run([sys.executable, "workflow.py", "--results-dir", str(under)]), f"--results-dir={under}")
    assert_one_line(run([sys.executable, "run_single_config.py", "--save-results", "--output-dir", str(under)]),
                    f"--output-dir={under}")
    assert_one_line(run([sys.executable, "analyze_saved_data.py", "--data1", "x", "--data2", "y", "--output-dir",
                         str(under)]), f"--output-dir={under}")
    run_folder = tmp_path / "runs" / "one"
    run_folder.mkdir(parents=True)
    (run_folder / "benchmark_results.json").write_text("{}")
    assert_one_line(run([sys.executable, "analyze.py", str(tmp_path / "runs"), "--csv", str(under / "t.csv")]),
                    f"--csv {under / 't.csv'}")
    assert_one_line(run([sys.executable, "run_mixed_precision.py", "--output", str(under / "r.json")]), "--output=")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("matrix:\n  GAMMA_VALUE: [2]\n")
    assert_one_line(run([str(ROOT / "run_sweep.sh"), str(sweep), "--output-root", str(under)]),
                    f"--output-root {under}")


# ------------------------------------------------------------------------ values accepted silently, messages

def test_wrong_values_are_refused_with_the_option_the_user_typed(tmp_path):
    config = tmp_path / "edge_cloud.yaml"
    for port in ("0", "99999", "28085.5"):
        config.write_text(f"edge:\n  server:\n    port: {port}\n")
        assert_one_line(run([sys.executable, "start_edge.py", "--config", str(config)]), "edge.server.port",
                        "from 1 to 65535")
    config.write_text("communication:\n  cloud_endpoint: http://127.0.0.1:99999\n")
    assert_one_line(run([sys.executable, "edge_cloud.py", "--prompt", "hi", "--config", str(config)]),
                    "communication.cloud_endpoint: 'http://127.0.0.1:99999'", "port 1 to 65535")
    for setting in ("max_tokens: 99999", "temperature: 50", "seed: -1"):  # the bounds the servers hold the client to
        config.write_text(f"inference:\n  {setting}\n")
        assert_one_line(run([sys.executable, "edge_cloud.py", "--prompt", "hi", "--config", str(config)]),
                        f"inference.{setting.split(':')[0]}: ", "out of range")
    assert_one_line(run([sys.executable, "workflow.py", "--config1-iter", "0"]), "--config1-iter=0")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("matrix:\n  GAMMA_VALUE: [2, 0]\n")
    proc = run([str(ROOT / "run_sweep.sh"), str(sweep), "--dry-run", "--output-root", str(tmp_path / "s")])
    assert_one_line(proc, f"{sweep}: GAMMA_VALUE='0' (in combination gamma_value-0)")
