"""Mixed-precision formats, layers, loader, config validation and export (lib/quant, run_mixed_precision.py)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lib.errors import UsageError
from lib.files import ROOT
from lib.quant.formats import FP8_MAX, QuantOptions, quantize_fp8, quantize_int8
from lib.quant.gptq import GPTQWeight, hessian_from_inputs, quantize_gptq, quantize_rtn
from lib.quant.linear import MixedPrecisionLinear, model_memory
from lib.quant.loader import check_mixed_precision_config, check_placement, load_config, load_mixed_model, write_sources

SHIPPED = ROOT / "configs" / "mixed_precision_config.yaml"


# ------------------------------------------------------------------ a straightforward GPTQ reference (plain loops)

def ref_pack(values: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """One LSB-first bit stream per column (axis 0) or row (axis 1), cut into 32-bit words."""
    v = values if axis == 0 else values.T
    n, m = v.shape
    words = np.zeros((n * bits // 32, m), dtype=np.uint64)
    for col in range(m):
        for i in range(n):
            for b in range(bits):
                pos = i * bits + b
                words[pos // 32, col] |= np.uint64((int(v[i, col]) >> b) & 1) << np.uint64(pos % 32)
    out = words.astype(np.uint32).view(np.int32)
    return out if axis == 0 else out.T.copy()


def ref_dequant(q, zeros_true, scales, g_idx) -> np.ndarray:
    in_f, out_f = q.shape
    w = np.zeros((out_f, in_f), dtype=np.float64)
    for i in range(in_f):
        g = g_idx[i]
        for o in range(out_f):
            w[o, i] = (q[i, o] - zeros_true[g, o]) * float(scales[g, o])
    return w


def random_gptq(in_f, out_f, bits, group_size, act_order, zero_format, seed=0):
    rng = np.random.default_rng(seed)
    groups = 1 if group_size == -1 else in_f // group_size
    q = rng.integers(0, 2**bits, (in_f, out_f))
    zeros_true = rng.integers(1, 2**bits, (groups, out_f))  # >= 1 so v1's "zero - 1" stays in range
    scales = rng.uniform(0.001, 0.05, (groups, out_f)).astype(np.float16)
    size = in_f if group_size == -1 else group_size
    g_idx = np.arange(in_f) // size
    if act_order:
        g_idx = g_idx[rng.permutation(in_f)]
    stored = zeros_true - 1 if zero_format == "v1" else zeros_true
    fmt = GPTQWeight(torch.from_numpy(ref_pack(q, bits, 0)), torch.from_numpy(ref_pack(stored, bits, 1)),
                     torch.from_numpy(scales), torch.from_numpy(g_idx.astype(np.int32)), bits=bits,
                     group_size=group_size, zero_format=zero_format)
    return fmt, ref_dequant(q, zeros_true, scales, g_idx)


@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("zero_format", ["v1", "v2"])
def test_gptq_dequantize_matches_reference(group_size, act_order, zero_format):
    fmt, ref = random_gptq(256, 24, 4, group_size, act_order, zero_format)
    assert fmt.qweight.shape == (32, 24) and fmt.qzeros.shape == (fmt.scales.shape[0], 3)
    np.testing.assert_allclose(fmt.dequantize(torch.float64).numpy(), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_gptq_other_bit_widths_match_reference(bits):
    fmt, ref = random_gptq(128, 32, bits, 32, False, "v2", seed=bits)
    assert fmt.qweight.shape == (128 * bits // 32, 32)
    np.testing.assert_allclose(fmt.dequantize(torch.float64).numpy(), ref, rtol=0, atol=1e-6)


def test_seed_shapes_96_vs_768():
    """A GPTQ checkpoint's case: qzeros [16, 96] is 768 outputs packed 8 per int32; the weight is [768, 2048]."""
    torch.manual_seed(0)
    qweight = torch.randint(-2**31, 2**31 - 1, (256, 768), dtype=torch.int32)
    qzeros = torch.randint(-2**31, 2**31 - 1, (16, 96), dtype=torch.int32)
    scales = torch.rand(16, 768, dtype=torch.float16)
    g_idx = (torch.arange(2048) // 128).to(torch.int32)
    fmt = GPTQWeight(qweight, qzeros, scales, g_idx, bits=4, group_size=128)
    w = fmt.dequantize()
    assert w.shape == (768, 2048)
    q = (qweight[5, 7].item() >> 4 * 3) & 0xF            # input row 5*8+3 = 43, output 7
    z = ((qzeros[0, 0].item() >> 4 * 7) + 1) & 0xF        # group 0, output 7 (v1 stores zero - 1)
    assert w[7, 43].item() == pytest.approx((q - z) * scales[0, 7].item(), abs=1e-3)
    with pytest.raises(ValueError, match="qzeros"):
        GPTQWeight(qweight, torch.zeros(16, 768, dtype=torch.int32), scales, g_idx)  # unpacked zeros: refused


@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("zero_format", ["v1", "v2"])
def test_rtn_round_trip_within_half_a_step(group_size, zero_format):
    torch.manual_seed(1)
    w = torch.randn(48, 256)
    for order in (None, torch.randperm(256)):
        fmt = quantize_rtn(w, 4, group_size, zero_format, act_order=order)
        step = fmt.scales.float()[fmt.g_idx.long()].t()  # [out, in]
        assert ((fmt.dequantize() - w).abs() <= step / 2 + 1e-4).all()


def test_gptq_algorithm_beats_round_to_nearest_on_its_calibration_inputs():
    torch.manual_seed(2)
    x = torch.randn(512, 32) @ torch.randn(32, 128) + 0.1 * torch.randn(512, 128)  # correlated inputs, as in LLMs
    w = torch.randn(64, 128)
    h = hessian_from_inputs(x)
    def err(fmt):
        return ((x @ w.t() - x @ fmt.dequantize().t()) ** 2).mean().item()
    rtn = err(quantize_rtn(w, 4, 32))
    assert err(quantize_gptq(w, h, 4, 32)) < 0.5 * rtn
    act = quantize_gptq(w, h, 4, 32, act_order=True)
    assert err(act) < 0.5 * rtn
    assert not torch.equal(act.g_idx.long(), torch.arange(128) // 32)  # act-order permuted the groups


@pytest.mark.parametrize("per_channel", [False, True])
def test_fp8_round_trip_within_e4m3_rounding(per_channel):
    torch.manual_seed(3)
    w = torch.randn(64, 96) * torch.logspace(-2, 1, 64).unsqueeze(1)
    fmt = quantize_fp8(w, per_channel)
    assert fmt.weight.dtype == torch.float8_e4m3fn and fmt.scale.shape == ((64, 1) if per_channel else ())
    scale = fmt.scale if per_channel else fmt.scale.expand(64, 1)
    # 3 mantissa bits: half a step is 2**-4 relative for normals; subnormal steps are 2**-9 (times the scale)
    bound = torch.maximum(w.abs() * 2**-4, scale * 2**-10) + 1e-7
    assert ((fmt.dequantize() - w).abs() <= bound).all()
    assert fmt.weight.float().abs().max() <= FP8_MAX


def test_int8_round_trip_within_half_a_step():
    torch.manual_seed(4)
    w = torch.randn(32, 80)
    fmt = quantize_int8(w)
    assert fmt.weight.dtype == torch.int8 and fmt.scale.shape == (32, 1)
    assert ((fmt.dequantize() - w).abs() <= fmt.scale / 2 + 1e-6).all()


# ------------------------------------------------------------------ the layer

@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp8", "int8", "int4"])
def test_layer_matches_dequantized_linear_and_counts_its_bytes(precision):
    from lib.quant.formats import quantize_weight
    torch.manual_seed(5)
    lin = nn.Linear(128, 64, bias=True)
    fmt = quantize_weight(lin.weight, precision, QuantOptions(int4_group_size=64))
    layer = MixedPrecisionLinear(fmt, precision, lin.bias)
    x = torch.randn(3, 5, 128)
    expect = torch.nn.functional.linear(x, fmt.dequantize(torch.float32), lin.bias)
    torch.testing.assert_close(layer(x), expect)
    held = sum(t.numel() * t.element_size() for t in list(layer.buffers()) + list(layer.parameters()))
    mem = layer.memory("l")
    assert mem.stored_bytes == held and mem.cache_bytes == 0
    assert mem.fp16_bytes == 2 * (128 * 64 + 64)
    assert mem.compression_ratio == pytest.approx(mem.fp16_bytes / held)
    cached = MixedPrecisionLinear(fmt, precision, lin.bias, cache_dequantized=True)
    cached(x)
    assert cached.memory().cache_bytes == 128 * 64 * 4  # the fp32 copy it now holds


# ------------------------------------------------------------------ the loader on the tiny target

@pytest.fixture(scope="module")
def mixed(tiny_models):
    model, cfg, plan = load_mixed_model(SHIPPED, tiny_models.target)
    return model, cfg, plan


def test_shipped_config_loads_generates_and_reports_true_memory(mixed, tiny_models):
    model, cfg, plan = mixed
    assert plan["model.layers.0.self_attn.q_proj.weight"] == "fp16"
    assert plan["model.layers.0.mlp.up_proj.weight"] == "fp8"
    assert plan["model.layers.2.mlp.down_proj.weight"] == "int4"
    assert plan["model.layers.3.mlp.gate_proj.weight"] == "int8"
    layers = {n: m for n, m in model.named_modules() if isinstance(m, MixedPrecisionLinear)}
    assert len(layers) == 28 and layers["model.layers.2.mlp.down_proj"].qweight.dtype == torch.int32
    assert layers["model.layers.0.mlp.up_proj"].weight.dtype == torch.float8_e4m3fn
    mem = model_memory(model)
    held = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    assert mem.stored_bytes == held
    assert mem.compression_ratio > 1.1 and mem.memory_saved_mb > 0
    assert check_placement(model, "cpu", torch.float32) == []
    out = model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=8, do_sample=False)
    assert out.shape == (1, 12)


def test_check_placement_reports_a_stray_tensor(mixed):
    model = mixed[0]
    norm = model.model.norm
    norm.weight.data = norm.weight.data.to(torch.bfloat16)
    try:
        problems = check_placement(model, "cpu", torch.float32)
        assert problems == ["parameter model.norm.weight is torch.bfloat16, expected torch.float32"]
    finally:
        norm.weight.data = norm.weight.data.to(torch.float32)


def test_greedy_speculative_equals_ar_on_the_mixed_target(tiny_models):
    from lib.config import resolve
    from lib.engines.pytorch_engine import PyTorchEngine
    from lib.models import resolve_models
    from lib.types import Clock, Request
    env = {"MIXED_PRECISION_CONFIG": str(SHIPPED), "GAMMA_VALUE": "3"}
    cfg = resolve(None, env)
    models = resolve_models(cfg)
    outs = {}
    for method in ("target", "speculative"):
        eng = PyTorchEngine(cfg, method, models)
        eng.start()
        assert any(isinstance(m, MixedPrecisionLinear) for m in eng.target.modules())
        reqs = [Request(i, p, eng.tokenizer(p).input_ids, 24) for i, p in enumerate(["Once upon a time", "The cat"])]
        outs[method] = [r.output_ids for r in eng.generate_batch(reqs, Clock())]
    assert outs["speculative"] == outs["target"]


# ------------------------------------------------------------------ bad configs: one line naming the entry

def write_cfg(tmp_path, body: str) -> Path:
    p = tmp_path / "mp.yaml"
    p.write_text("mixed_precision:\n" + body)
    return p


def test_unknown_precision_names_the_entry(tmp_path):
    p = write_cfg(tmp_path, "  weight_mapping:\n    model.layers.0.mlp.up_proj.weight: int3\n")
    with pytest.raises(UsageError,
                       match=r"weight_mapping\['model.layers.0.mlp.up_proj.weight'\]: unknown precision 'int3'"):
        load_config(p)


def test_weight_mapped_twice_names_it(tmp_path, tiny_models):
    p = write_cfg(tmp_path, "  weight_mapping:\n    model.layers.0.mlp.up_proj.weight: fp8\n"
                            "    model.layers.0.mlp.up_proj.weight: int4\n")
    with pytest.raises(UsageError, match=r"line 4: 'model.layers.0.mlp.up_proj.weight' is listed twice"):
        load_config(p)
    p = write_cfg(tmp_path, "  patterns:\n    'model\\.layers\\.0\\..*': fp8\n    '.*up_proj.*': int8\n")
    with pytest.raises(UsageError, match=r"model.layers.0.mlp.up_proj.weight is mapped twice"):
        load_mixed_model(p, tiny_models.target)


def test_missing_path_names_the_precision(tmp_path, tiny_models):
    from lib.models import load_model
    write_sources(load_model(tiny_models.target), tmp_path / "src", precisions=("fp16",))
    p = write_cfg(tmp_path, f"  fp16_path: {tmp_path / 'src' / 'fp16'}\n  default: fp16\n  weight_mapping:\n"
                            "    model.layers.1.mlp.down_proj.weight: int4\n")
    with pytest.raises(UsageError, match=r"mixed_precision.int4_path: missing, but 1 weights are mapped to int4"):
        load_mixed_model(p, tiny_models.target)


def test_shape_mismatch_names_the_weight(tmp_path, tiny_models):
    from lib.models import load_model
    write_sources(load_model(tiny_models.draft), tmp_path / "src", precisions=("fp8",))
    p = write_cfg(tmp_path, "  fp8_path: src/fp8\n  default: fp8\n")  # relative to the config's folder
    with pytest.raises(UsageError, match=r"weight_mapping\['model.layers.0.self_attn.q_proj.weight'\]: fp8 source "
                                         r".* has shape \[64, 64\], the model expects \[128, 128\]"):
        load_mixed_model(p, tiny_models.target)


def test_unknown_weight_name_is_refused(tmp_path, tiny_models):
    p = write_cfg(tmp_path, "  weight_mapping:\n    model.layers.9.mlp.up_proj.weight: fp8\n")
    with pytest.raises(UsageError, match=r"\['model.layers.9.mlp.up_proj.weight'\]: is not a weight of this model"):
        load_mixed_model(p, tiny_models.target)


def test_script_bad_config_is_one_line_exit_2(tmp_path):
    p = write_cfg(tmp_path, "  default: fp4\n")
    r = subprocess.run([sys.executable, "run_mixed_precision.py", "--config", str(p)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {p}: mixed_precision.default: unknown precision 'fp4'; "
                                             "accepted: fp16, bf16, fp8, int8, int4"]


# ------------------------------------------------------------------ damaged sources, group sizes, the check

@pytest.fixture(scope="module")
def int8_source(tiny_models, tmp_path_factory) -> Path:
    """A good int8 source of the tiny target (every Linear weight)."""
    from lib.models import load_model
    root = tmp_path_factory.mktemp("sources")
    write_sources(load_model(tiny_models.target), root, precisions=("int8",))
    return root / "int8"


def damaged_copy(source: Path, dest: Path, name: str, content: bytes) -> Path:
    import shutil
    shutil.copytree(source, dest)
    (dest / name).write_bytes(content)
    return dest


SOURCE_DAMAGE = [  # (file, its new content, the words of the one line)
    ("model.safetensors", b"\x07\x00", "model.safetensors is not a complete safetensors file (Error while "
                                         "deserializing header"),
    ("quant_meta.json", b"{bad", "quant_meta.json: not valid JSON"),
    ("quant_meta.json", b"[1]", "quant_meta.json: found a list [1]; accepted: a mapping with keys precision, bits"),
    ("quant_meta.json", b'{"precision": "int4"}', "quant_meta.json: precision: found 'int4'; accepted: int8 (the "
                                                  "precision of int8_path)"),
    ("quant_meta.json", b'{"bits": 5}', "quant_meta.json: bits: unknown bit width 5; accepted: 2, 3, 4, 8"),
]


@pytest.mark.parametrize("name, content, words", SOURCE_DAMAGE)
def test_a_damaged_source_is_one_line_naming_the_key_and_file(tmp_path, tiny_models, int8_source, name, content,
                                                               words):
    folder = damaged_copy(int8_source, tmp_path / "int8", name, content)
    p = write_cfg(tmp_path, f"  int8_path: {folder}\n  default: int8\n")
    for check in (load_mixed_model, check_mixed_precision_config):
        with pytest.raises(UsageError) as caught:
            check(p, tiny_models.target)
        message = str(caught.value)
        assert message.startswith(f"{p}: mixed_precision.int8_path: {folder}: ") and words in message


def test_a_gptq_quantize_config_with_its_own_keys_is_read(tmp_path, tiny_models):
    """A GPTQ checkpoint names its metadata quantize_config.json and holds keys the loader does not read."""
    from lib.models import load_model
    write_sources(load_model(tiny_models.target), tmp_path, QuantOptions(int4_group_size=32), precisions=("int4",))
    (tmp_path / "int4" / "quant_meta.json").unlink()
    (tmp_path / "int4" / "quantize_config.json").write_text(json.dumps(
        {"bits": 4, "group_size": 32, "damp_percent": 0.01, "desc_act": False, "sym": False, "true_sequential": True,
         "model_name_or_path": None, "quant_method": "gptq", "checkpoint_format": "gptq"}))
    p = write_cfg(tmp_path, f"  int4_path: {tmp_path / 'int4'}\n  default: int4\n")
    check_mixed_precision_config(p, tiny_models.target)
    model, _, plan = load_mixed_model(p, tiny_models.target)
    assert set(plan.values()) == {"int4"}
    assert model.get_submodule("model.layers.1.mlp.down_proj").fmt.group_size == 32


@pytest.mark.parametrize("body", ["  default: int4\n  int4: {group_size: 7}\n",
                                  "  weight_mapping:\n    model.layers.1.mlp.down_proj.weight: int4\n"
                                  "  int4: {group_size: 256}\n"])
def test_a_group_size_that_does_not_divide_an_int4_width_names_the_key(tmp_path, tiny_models, body, monkeypatch):
    import lib.quant.loader as loader
    def no_quantizing(*args):
        raise AssertionError("quantized before the group size was checked")
    monkeypatch.setattr(loader, "write_sources", no_quantizing)
    p = write_cfg(tmp_path, body)
    for check in (load_mixed_model, check_mixed_precision_config):
        with pytest.raises(UsageError, match=rf"^{p}: mixed_precision.int4.group_size: \d+ does not divide the input "
                                             r"width \d+ of model\.layers\.\d\.[a-z_.]+; accepted: -1, or a whole "
                                             r"number >= 1 dividing every int4 layer's input width \(here a divisor "
                                             r"of (128|384)\)$"):
            check(p, tiny_models.target)


def test_the_check_before_a_run_reads_no_weight(tmp_path, tiny_models, monkeypatch):
    """check_mixed_precision_config finds what the loader would refuse from headers and the model's shapes alone."""
    import lib.models
    import lib.quant.loader as loader
    from lib.models import load_model
    write_sources(load_model(tiny_models.draft), tmp_path / "draft", precisions=("fp8",))
    write_sources(load_model(tiny_models.target), tmp_path / "target", precisions=("fp16",))

    def no_weights(*args, **kwargs):
        raise AssertionError("a weight was read")
    for module, name in ((lib.models, "load_model"), (loader, "write_sources"), (loader, "tiny_sources"),
                         (loader.SourceReader, "read")):
        monkeypatch.setattr(module, name, no_weights)
    check_mixed_precision_config(SHIPPED, tiny_models.target)
    good = write_cfg(tmp_path, f"  fp16_path: {tmp_path / 'target' / 'fp16'}\n")
    check_mixed_precision_config(good, tiny_models.target)
    cases = [(f"  fp8_path: {tmp_path / 'draft' / 'fp8'}\n  default: fp8\n",
              r"weight_mapping\['model.layers.0.self_attn.q_proj.weight'\]: fp8 source .* has shape \[64, 64\], the "
              r"model expects \[128, 128\]"),
             (f"  fp16_path: {tmp_path / 'target' / 'fp16'}\n  weight_mapping:\n"
              "    model.layers.1.mlp.down_proj.weight: int4\n", r"int4_path: missing, but 1 weights are mapped"),
             ("  weight_mapping:\n    model.layers.9.mlp.up_proj.weight: fp8\n", r"is not a weight of this model")]
    for body, words in cases:
        with pytest.raises(UsageError, match=words):
            check_mixed_precision_config(write_cfg(tmp_path, body), tiny_models.target)


def test_an_empty_tokenization_is_refused():
    from run_mixed_precision import prompt_ids

    def tokenizer(text, return_tensors):
        return type("Encoded", (), {"input_ids": torch.empty(1, 0, dtype=torch.long)})
    with pytest.raises(UsageError, match=r"^--prompt='\\u200b': the tokenizer makes no token of it"):
        prompt_ids(tokenizer, "\u200b", "cpu")


@pytest.mark.parametrize("args, line", [
    (["--make-sources", "{tmp}/s", "--group-size", "0"], "--group-size=0: 0 is not a group size; accepted: a whole "
                                                         "number >= 1, or -1 (one group over the whole input)"),
    (["--make-sources", "{tmp}/s", "--group-size", "-5"], "--group-size=-5: -5 is not a group size"),
    (["--make-sources", "{tmp}/s", "--group-size", "7"], "--group-size=7: 7 does not divide the input width 128 of "
                                                         "model.layers.0.self_attn.q_proj.weight; accepted: -1, or"),
    (["--config", "{tmp}/gs.yaml"], "{tmp}/gs.yaml: mixed_precision.int4.group_size: 7 does not divide"),
    (["--config", "{tmp}/bad_src.yaml"], "{tmp}/bad_src.yaml: mixed_precision.int8_path: {tmp}/int8: "
                                         "model.safetensors is not a complete safetensors file"),
    (["--prompt", ""], "--prompt='': expected a text with at least one non-blank character"),
    (["--prompt", " \t"], "--prompt=' \\t': expected a text with at least one non-blank character"),
])
def test_script_bad_sources_group_sizes_and_prompts_are_one_line_exit_2(tmp_path, args, line):
    (tmp_path / "gs.yaml").write_text("mixed_precision:\n  default: int4\n  int4: {group_size: 7}\n")
    (tmp_path / "int8").mkdir()
    (tmp_path / "int8" / "model.safetensors").write_bytes(b"\x07\x00")
    (tmp_path / "bad_src.yaml").write_text(f"mixed_precision:\n  int8_path: {tmp_path / 'int8'}\n  default: int8\n")
    r = subprocess.run([sys.executable, "run_mixed_precision.py", "--max-new-tokens", "2", "--ppl-docs", "0",
                        *(a.format(tmp=tmp_path) for a in args)], cwd=ROOT, capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith("error: " + line.format(tmp=tmp_path)), lines[0]


# ------------------------------------------------------------------ the script and the export

def test_script_reports_memory_perplexity_and_speed(tmp_path):
    out = tmp_path / "report.json"
    exp = tmp_path / "ct"
    r = subprocess.run([sys.executable, "run_mixed_precision.py", "--max-new-tokens", "12", "--ppl-docs", "8",
                        "--export", str(exp), "--output", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(out.read_text())
    for name in ("mixed", "unquantized"):
        assert 1.0 < rep[name]["perplexity"] < 1000 and rep[name]["tokens_per_s"] > 0
        assert len(rep[name]["output_ids"]) == 12
    # rounding costs a little, never a lot, on this model
    assert rep["mixed"]["perplexity"] == pytest.approx(rep["unquantized"]["perplexity"], rel=0.1)
    assert rep["memory"]["by_precision"]["int4"]["layers"] == 3
    assert rep["export"]["format"] == "mixed-precision"


def test_export_round_trips_through_compressed_tensors(mixed, tmp_path):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    from lib.quant.export import export_compressed_tensors
    model = mixed[0]
    export_compressed_tensors(model, tmp_path)
    qcfg = QuantizationConfig.model_validate(json.loads((tmp_path / "config.json").read_text())["quantization_config"])
    assert "model.layers.0.self_attn.q_proj" in qcfg.ignore and "lm_head" in qcfg.ignore
    group_of = {t: g for g in qcfg.config_groups.values() for t in g.targets}
    assert group_of["model.layers.2.mlp.up_proj"].weights.num_bits == 4
    assert group_of["model.layers.0.mlp.up_proj"].weights.type == "float"
    sd = load_file(str(tmp_path / "model.safetensors"))
    layer = model.get_submodule("model.layers.2.mlp.up_proj")
    fmt = layer.fmt
    q = unpack_from_int32(sd["model.layers.2.mlp.up_proj.weight_packed"], 4, torch.Size([384, 128])).float()
    zp = unpack_from_int32(sd["model.layers.2.mlp.up_proj.weight_zero_point"], 4, torch.Size([384, 1]),
                           packed_dim=0).float()
    scale = sd["model.layers.2.mlp.up_proj.weight_scale"].float()
    torch.testing.assert_close((q - zp) * scale, fmt.dequantize(torch.float32))
    fp8 = model.get_submodule("model.layers.0.mlp.up_proj").fmt
    torch.testing.assert_close(sd["model.layers.0.mlp.up_proj.weight"].float() *
                               sd["model.layers.0.mlp.up_proj.weight_scale"], fp8.dequantize())
