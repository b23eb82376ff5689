"""The fast path's Triton kernels on CPU, through Triton's interpreter (TRITON_INTERPRET=1 runs a kernel's own
code with NumPy): lib/decoding/gemv.py's product and lib/decoding/decode_attention.py's attention, their masks and
their block choices. The interpreter must be chosen before Triton is first imported, so each kernel runs
in a fresh process. float16, because the interpreter rounds bfloat16 by truncation (the GPU rounds to nearest);
tests/test_gpu.py runs bfloat16 on a GPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lib.decoding import decode_attention, gemv

ROOT = Path(__file__).resolve().parent.parent
PRODUCTS = """
import json, sys
import torch
from lib.decoding import gemv
torch.manual_seed(0)
out = []
for rows, n, k, blocks, gated in json.loads(sys.argv[1]):
    x, w = torch.randn(rows, k, dtype=torch.float16), torch.randn(n, k, dtype=torch.float16) / k ** 0.5
    y = gemv.launch(x, w, gemv.Blocks(*blocks) if blocks else None, gated=gated)
    ref = x.double() @ w.double().T
    if gated:  # w's rows are (gate, up) pairs
        ref = torch.nn.functional.silu(ref[:, 0::2]) * ref[:, 1::2]
    out.append({"shape": list(y.shape), "rel_err": ((y.double() - ref).norm() / ref.norm()).item()})
print(json.dumps(out))
"""
ATTENTION = """
import json, sys
import torch
from lib.decoding import decode_attention, fast_path
torch.manual_seed(0)
out = []
for batch, n, n_heads, n_kv, head_dim, length in json.loads(sys.argv[1]):
    q = torch.randn(batch, n, n_heads, head_dim, dtype=torch.float16)
    k, v = (torch.randn(batch, n_kv, length, head_dim, dtype=torch.float16) for _ in range(2))
    first = torch.randint(0, length - n, (batch, 1))
    first[0] = 0  # a row whose first query sees one column only
    first[-1] = length - n if batch > 1 else 0  # and one whose last query sees the whole cache
    positions = first + torch.arange(n)
    y = decode_attention.launch(q, k, v, positions, head_dim ** -0.5).flatten(2)
    # the eager attention the kernel replaces, in float64
    arch = fast_path.Arch(n_heads, n_kv, head_dim, eps=1e-6, scale=head_dim ** -0.5, act=None)
    ref = fast_path.attention(q.double(), k.double(), v.double(), positions, arch)
    out.append({"shape": list(y.shape), "rel_err": ((y.double() - ref).norm() / ref.norm()).item()})
print(json.dumps(out))
"""
PICK = """
import json, sys
import torch
from lib.decoding import pick
from lib.decoding.chain import top2
torch.manual_seed(0)
out = []
for rows, width, vocab, dtype, special in json.loads(sys.argv[1]):
    logits = (torch.randn(rows, width, vocab) * 3).to(getattr(torch, dtype))
    if special == "ties":  # the largest logit twice: in one part, across parts, at the ragged end
        top = logits.max() + 1
        logits[0, -1, [5, 9]] = top
        logits[-1, -1, [3000, vocab - 1]] = top
    elif special == "last":
        logits[:, -1, vocab - 1] = logits.max() + 1
    elif special == "inf":
        logits[0, -1, :] = float("-inf")
        logits[-1, -1, 70] = float("inf")
    elif special == "nan":
        logits[0, -1, [11, 4000]] = float("nan")
    last = logits[:, -1]  # strided rows when width > 1, as the AR step hands them over
    token, tops = pick.greedy_top2(last)
    out.append({"token": token.tolist(), "argmax": last.argmax(-1).tolist(), "tops_equal":
                torch.equal(tops.nan_to_num(-7.0), top2(last).nan_to_num(-7.0)), "dtype": str(tops.dtype),
                "tops": tops.tolist()})
print(json.dumps(out))
"""


def interpreted(script: str, cases: list) -> list[dict]:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_product_equals_a_float64_one():
    """One row: a ragged N (the last program's rows masked), several K chunks, the block that blocks_for picks for
    a K of 3 chunks of 64, a K of one chunk (the first chunk is loaded before the loop), and one of `MEASURED`'s
    blocks (a K of 2048 per chunk). Several rows (the tensor-core kernel, x's rows padded to 16 and masked): a
    ragged N, 2, 5 and 16 rows, blocks_for's narrow and wide blocks."""
    cases = [(1, 40, 128, (4, 64, 4, 1)), (1, 37, 256, (8, 128, 4, 1)), (1, 24, 192, None), (1, 16, 64, None),
             (1, 6, 4096, tuple(gemv.MEASURED[(2048, 8192)])), (5, 40, 128, (32, 64, 4, 1)), (2, 37, 192, None),
             (16, 64, 512, None), (3, 16448, 128, None)]
    for (rows, n, _, _), result in zip(cases, interpreted(PRODUCTS, [case + (False,) for case in cases])):
        assert result["shape"] == [rows, n]
        assert result["rel_err"] < 2e-3, result


def test_gated_product_equals_silu_gate_times_up_in_float64():
    """The gate/up product ending in SiLU(gate) * up (rows in pairs): one row and several, a program's pairs
    ragged at the end (N / 2 not a multiple of its BLOCK_N / 2), `MEASURED`'s 1B gate/up block."""
    cases = [(1, 40, 128, (8, 64, 4, 1)), (1, 64, 2048, tuple(gemv.MEASURED[(16384, 2048)])), (1, 72, 256, None),
             (2, 40, 128, (32, 64, 4, 1)), (16, 200, 256, None), (5, 16448, 128, None)]
    for (rows, n, _, _), result in zip(cases, interpreted(PRODUCTS, [case + (True,) for case in cases])):
        assert result["shape"] == [rows, n // 2]
        assert result["rel_err"] < 3e-3, result


def test_gated_product_refuses_rows_that_do_not_pair():
    """An odd number of rows cannot be (gate, up) pairs: one clear error, before any kernel runs."""
    with pytest.raises(ValueError, match="pairs of rows; w has 41 rows"):
        gemv.launch(torch.randn(1, 64, dtype=torch.float16), torch.randn(41, 64, dtype=torch.float16), gated=True)


def test_attention_equals_the_eager_one_in_float64():
    """Against lib/decoding/fast_path.py's eager attention: GQA ratios 4, 2 and 1, one token and several (each
    query row masked at its own position), rows at different positions, a cache length that is not a multiple of
    the tile. Under 64 (row, kv head) pairs each pair's columns are split over 4 programs, the last of which
    merges (splits left without a column, and a row whose columns fill all four); the last case has 64 pairs
    and one program each."""
    cases = [(1, 1, 8, 2, 64, 192), (2, 5, 8, 4, 32, 256), (3, 2, 6, 3, 16, 100), (2, 1, 4, 4, 64, 320),
             (2, 1, 8, 2, 64, 512), (16, 1, 8, 4, 16, 100)]
    for (batch, n, n_heads, _, head_dim, _), result in zip(cases, interpreted(ATTENTION, cases)):
        assert result["shape"] == [batch, n, n_heads * head_dim]
        assert result["rel_err"] < 2e-3, result


def test_greedy_pick_equals_torch_argmax_and_top2_to_the_bit():
    """lib/decoding/pick.py against torch.argmax and chain.top2 on the same logits: a Llama-3 vocabulary (63
    parts, the last ragged), a vocabulary under one part, bf16, fp16 and float32, strided rows, the largest logit
    twice (in one part, across two, at the very end: the first index wins and the margin is 0), every logit -inf
    but one +inf, and NaNs (torch's argmax takes the first NaN). Two launches in a row on the same counts."""
    cases = [(1, 1, 128256, "bfloat16", ""), (3, 2, 128256, "bfloat16", "ties"), (2, 1, 1000, "float16", "last"),
             (4, 3, 5000, "float32", "inf"), (2, 1, 9000, "bfloat16", "nan"), (2, 1, 9000, "bfloat16", "nan")]
    results = interpreted(PICK, cases)
    for case, result in zip(cases, results):
        assert result["token"] == result["argmax"], (case, result)
        assert result["tops_equal"] and result["dtype"] == "torch.float32", (case, result)
    ties = results[1]
    assert ties["token"][0] == 5 and ties["token"][-1] == 3000 and ties["tops"][0][0] == 0.0


def test_cpu_tensors_keep_the_eager_ops_and_blocks_divide_k():
    """The fast path's CPU runs stay eager (token-identical to the plain path): the kernels take CUDA tensors only.
    (tests/test_gpu.py checks which CUDA steps they take.)"""
    assert not gemv.supports(torch.randn(1, 128, dtype=torch.float16), torch.randn(8, 128, dtype=torch.float16))
    cache = torch.zeros(1, 2, 64, 64, dtype=torch.float16)
    assert not decode_attention.supports(torch.zeros(1, 1, 8, 64, dtype=torch.float16), cache)
    assert gemv.blocks_for(6144, 4096) == gemv.Blocks(8, 512, 4, 3)
    assert gemv.blocks_for(6144, 4096, 5) == gemv.Blocks(64, 128, 4, 6)
    assert gemv.blocks_for(4096, 14336, 5) == gemv.Blocks(32, 256, 4, 6)
    assert gemv.blocks_for(28672, 4096, 16) == gemv.Blocks(64, 128, 4, 4) and gemv.blocks_for(64, 192, 2).block_k == 64
    assert gemv.blocks_for(896, 896).block_k == 128 and gemv.blocks_for(64, 192).block_k == 64
    assert all(k % blocks.block_k == 0 for (_, k), blocks in gemv.MEASURED.items())
