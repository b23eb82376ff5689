"""The four config formats (mixed precision, edge/cloud, sweep files, comparison presets) read one way: wrong types,
unknown keys, non-finite or out-of-range numbers and YAML aliases are one UsageError line naming file and key."""
import subprocess
import sys
from pathlib import Path

import pytest

from lib import comparison_config
from lib.edgecloud.settings import apply_overrides
from lib.edgecloud.settings import load_config as load_edge_cloud
from lib.errors import UsageError
from lib.files import ROOT
from lib.quant.loader import load_config as load_mixed_precision
from lib.sweep import load_sweep

ALIAS_BOMB = ("a: &a [x, x, x, x, x, x, x, x, x]\n"
              "b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
              "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
              "d: [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n")


def error_of(load, path: Path) -> str:
    with pytest.raises(UsageError) as info:
        load(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def load_preset_file(path: Path):
    comparison_config.PRESET_DIR = path.parent
    return comparison_config.load_preset(path.stem)


@pytest.fixture(autouse=True)
def _restore_preset_dir(monkeypatch):
    monkeypatch.setattr(comparison_config, "PRESET_DIR", comparison_config.PRESET_DIR)


# (loader, the label its errors start with)
FORMATS = {
    "mixed_precision": (load_mixed_precision, lambda p: str(p)),
    "edge_cloud": (load_edge_cloud, lambda p: f"--config {p}"),
    "sweep": (lambda p: load_sweep(str(p)), lambda p: str(p.resolve())),
    "preset": (load_preset_file, lambda p: f"configs/{p.stem}.yaml"),
}

CASES = [
    ("mixed_precision", 'mixed_precision:\n  int4: {group_size: "abc"}\n',
     "mixed_precision.int4.group_size: found text 'abc'; accepted: a whole number >= 1, or -1"),
    ("mixed_precision", "mixed_precision:\n  int4: {group_size: 2.5}\n",
     "mixed_precision.int4.group_size: found 2.5; accepted:"),
    ("mixed_precision", "mixed_precision:\n  int4: {group_size: 0}\n",
     "mixed_precision.int4.group_size: 0 is not a group size; accepted:"),
    ("mixed_precision", 'mixed_precision:\n  fp8: "yes"\n',
     "mixed_precision.fp8: found text 'yes'; accepted: a mapping with keys per_channel"),
    ("mixed_precision", "mixed_precision:\n  int4: [1, 2]\n",
     "mixed_precision.int4: found a list [1, 2]; accepted: a mapping with keys bits, group_size"),
    ("mixed_precision", 'mixed_precision:\n  cache_dequantized: "no"\n',
     "mixed_precision.cache_dequantized: found text 'no'; accepted: true or false"),
    ("mixed_precision", "mixed_precision:\n  int4: {group_sise: 7}\n",
     "mixed_precision.int4.group_sise: unknown key; accepted: bits, group_size, checkpoint_format"),
    ("mixed_precision", "mixed_precision:\n  int4: {bits: 5}\n",
     "mixed_precision.int4.bits: unknown bit width 5; accepted: 2, 3, 4, 8"),
    ("mixed_precision", "mixed_precision:\n  patterns:\n    '(': fp8\n",
     "mixed_precision.patterns['(']: not a valid regex"),
    ("mixed_precision", "mixed_precision: {}\ninference: {dtype: auto}\n",
     "inference: not read by any code; set DTYPE"),
    ("mixed_precision", "mixed_precision: {}\nserver: {port: 8080}\n", "server: not read by any code;"),
    ("mixed_precision", "mixed_precision: {}\nmixed_precision: {default: fp8}\n",
     "line 2: 'mixed_precision' is listed twice"),
    ("edge_cloud", "edge:\n  draft:\n    max_draft_tokens: 2.5\n",
     "edge.draft.max_draft_tokens: found 2.5; accepted: a whole number from 0 to 64"),
    ("edge_cloud", "edge:\n  draft:\n    max_draft_tokens: 65\n",
     "edge.draft.max_draft_tokens: 65 is out of range; accepted: a whole number from 0 to 64"),
    ("edge_cloud", "edge:\n  server:\n    port: 99999\n",
     "edge.server.port: 99999 is out of range; accepted: a whole number from 1 to 65535"),
    ("edge_cloud", "cloud:\n  server:\n    port: 28085.5\n",
     "cloud.server.port: found 28085.5; accepted: a whole number from 1 to 65535"),
    ("edge_cloud", "inference:\n  temperature: .nan\n",
     "inference.temperature: nan is not a finite number; accepted: a number from 0 to 10"),
    ("edge_cloud", "inference:\n  features:\n    use_kv_cache: 'yes'\n",
     "inference.features.use_kv_cache: found text 'yes'; accepted: true or false"),
    ("edge_cloud", "edge:\n  confidence:\n    weights: [1, 2]\n",
     "edge.confidence.weights: found 2 items; accepted: 4 numbers >= 0"),
    ("edge_cloud", "edge:\n  kv_cache:\n    max_sise: 3\n",
     "edge.kv_cache.max_sise: unknown key; accepted: enabled, max_size"),
    ("edge_cloud", "experiments:\n  ablations:\n    - {name: x, config_overrides: oops}\n",
     "experiments.ablations[0].config_overrides: found text 'oops'; accepted: a mapping of sections"),
    ("edge_cloud", "experiments:\n  ablations:\n    - {name: x, mode: sideways}\n",
     "experiments.ablations[0].mode: unknown mode 'sideways'; accepted: collaborative, edge_only, cloud_only"),
    ("sweep", "trend_nights: 0.5\n", "trend_nights: found 0.5; accepted: a whole number from 1 to 3660"),
    ("sweep", "budget_min: .inf\n", "budget_min: inf is not a finite number; accepted: a number > 0"),
    ("sweep", "regression:\n  metrics: speedup\n",
     "regression.metrics: found text 'speedup'; accepted: a list of metrics out of "),
    ("sweep", "regression:\n  metrics: [speedup, sped]\n", "regression.metrics[1]: unknown metric 'sped'; accepted:"),
    ("sweep", "matrix:\n  GAMMA_VALUE: 2\n", "matrix.GAMMA_VALUE: found 2; accepted: a non-empty list of values"),
    ("sweep", "fixed:\n  GAMMA_VALUE: [2, 4]\n", "fixed.GAMMA_VALUE: found a list [2, 4]; accepted: one value"),
    ("sweep", "matrix:\n  GAMMA_VALUE: [2]\n  GAMMA_VALUE: [4]\n", "line 3: 'GAMMA_VALUE' is listed twice"),
    ("preset", "spec_num_iters: 5\n", "spec_num_iters: unknown key; accepted: spec_num_iter, spec_tree_size"),
    ("preset", "spec_num_iter: 2.5\n", "spec_num_iter: found 2.5; accepted: a whole number from 1 to 64"),
    ("preset", "spec_tree_size: 1\n", "spec_tree_size: 1 is out of range; accepted: a whole number from 2 to 1024"),
    ("preset", "cuda_graph: 'yes'\n", "cuda_graph: found text 'yes'; accepted: true or false"),
    ("preset", "memory_limit: .nan\n", "memory_limit: nan is not a finite number; accepted: a number > 0 and <= 1"),
]


@pytest.mark.parametrize("fmt,body,expected", CASES, ids=[f"{c[0]}:{c[2].split(':')[0]}" for c in CASES])
def test_bad_value_is_one_line_naming_file_and_key(tmp_path, fmt, body, expected):
    load, label = FORMATS[fmt]
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    message = error_of(load, path)
    assert message.startswith(f"{label(path)}: {expected}"), message


@pytest.mark.parametrize("fmt", FORMATS)
def test_yaml_alias_bomb_is_refused(tmp_path, fmt):
    load, label = FORMATS[fmt]
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    assert error_of(load, path) == f"{label(path)}: not valid YAML (line 2: aliases (*name) are not accepted)"


def test_shipped_configs_still_load():
    mp = load_mixed_precision(ROOT / "configs" / "mixed_precision_config.yaml")
    assert mp.default == "fp16" and mp.options.int4_group_size == 128 and not mp.cache_dequantized
    cfg = load_edge_cloud()
    assert cfg["edge"]["draft"]["max_draft_tokens"] == 4 and Path(cfg["experiments"]["prompts_file"]).is_file()
    assert [a["name"] for a in cfg["experiments"]["ablations"]] == ["strict_confidence", "wan_50ms"]
    assert load_sweep("nightly_tiny").trend_nights == 7 and load_sweep("gpu_example").budget_min == 360
    assert comparison_config.load_preset("config2") == {"spec_num_iter": 2, "spec_tree_size": 12}


def test_empty_entries_take_the_defaults(tmp_path):
    mp = tmp_path / "mp.yaml"
    mp.write_text("mixed_precision:\n  patterns:\n  weight_mapping:\n  int4:\n")
    cfg = load_mixed_precision(mp)
    assert cfg.patterns == {} and cfg.weight_mapping == {} and cfg.options.int4_bits == 4
    sweep = tmp_path / "s.yaml"
    sweep.write_text("fixed:\nmatrix:\n  GAMMA_VALUE: [2, 3]\nregression:\n")
    assert load_sweep(str(sweep)).threshold_pct == 10.0


def test_edge_cloud_user_file_and_overrides_merge_over_the_defaults(tmp_path):
    user = tmp_path / "user.yaml"
    user.write_text("edge:\n  draft:\n    max_draft_tokens: 6\ncommunication:\n  http_client: {timeout: 5}\n")
    cfg = load_edge_cloud(user)
    assert cfg["edge"]["draft"]["max_draft_tokens"] == 6 and cfg["edge"]["server"]["port"] == 8080
    assert cfg["communication"]["http_client"] == {"timeout": 5.0, "max_retries": 3, "backoff_s": 0.2,
                                                   "connection_pool_size": 10}
    over = apply_overrides(cfg, {"edge": {"confidence": {"threshold": 0.8}}}, "experiment strict")
    assert over["edge"]["confidence"]["threshold"] == 0.8 and over["edge"]["draft"]["max_draft_tokens"] == 6
    with pytest.raises(UsageError, match=r"^experiment strict: edge\.server\.port: 70000 is out of range; accepted"):
        apply_overrides(cfg, {"edge": {"server": {"port": 70000}}}, "experiment strict")


def test_sweep_cli_bad_type_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("matrix:\n  GAMMA_VALUE: [2]\ntrend_nights: 0.5\n")
    proc = subprocess.run([sys.executable, "-m", "lib.sweep", str(bad), "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {bad.resolve()}: trend_nights: found 0.5; accepted: a whole number from 1 to 3660"]
