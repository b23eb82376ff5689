"""lib/decoding/gemv.py's Triton kernel on CPU, through Triton's interpreter (TRITON_INTERPRET=1 runs the kernel's
own code with NumPy): the product, its masks and its block choice. The interpreter must be chosen before Triton
is first imported, so the kernel runs in a fresh process. float16, because the interpreter rounds bfloat16 by
truncation (the GPU rounds to nearest); tests/test_gpu.py runs bfloat16 on a GPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lib.decoding import gemv

ROOT = Path(__file__).resolve().parent.parent
PRODUCTS = """
import json, sys
import torch
from lib.decoding import gemv
torch.manual_seed(0)
out = []
for n, k, blocks in json.loads(sys.argv[1]):
    x, w = torch.randn(1, k, dtype=torch.float16), torch.randn(n, k, dtype=torch.float16) / k ** 0.5
    y = gemv.launch(x, w, gemv.Blocks(*blocks) if blocks else None)
    ref = x.double() @ w.double().T
    out.append({"shape": list(y.shape), "rel_err": ((y.double() - ref).norm() / ref.norm()).item()})
print(json.dumps(out))
"""


def interpreted_products(cases: list) -> list[dict]:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", PRODUCTS, json.dumps(cases)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("cases", [[(40, 128, (4, 64, 4, 1)), (37, 256, (8, 128, 4, 1)), (24, 192, None)]])
def test_product_equals_a_float64_one(cases):
    """A ragged N (the last program's rows masked), several K chunks, and the block that blocks_for picks for a K
    of 3 chunks of 64."""
    for (n, _, _), result in zip(cases, interpreted_products(cases)):
        assert result["shape"] == [1, n]
        assert result["rel_err"] < 2e-3, result


def test_cpu_tensors_keep_the_eager_product_and_blocks_divide_k():
    """The fast path's CPU runs stay eager (token-identical to the plain path): the kernel takes CUDA tensors only."""
    assert not gemv.supports(torch.randn(1, 128, dtype=torch.float16), torch.randn(8, 128, dtype=torch.float16))
    assert gemv.blocks_for(6144, 4096) == gemv.Blocks(8, 512, 4, 3)
    assert gemv.blocks_for(896, 896).block_k == 128 and gemv.blocks_for(64, 192).block_k == 64
