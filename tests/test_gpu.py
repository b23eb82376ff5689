"""GPU-only paths of the PyTorch engine: CUDA-graph capture and torch.compile of the fast path, pinned-memory
reads of SD rounds, multi-GPU placement and the Triton products. Run them on a GPU machine with
`pytest -m gpu`; without CUDA they are skipped (there is nothing to run them on)."""
import pytest
import torch

from lib import config as C
from lib.decoding.chain import autoregressive_generate
from lib.decoding.fast_path import (
    StaticDecoder,
    max_len_for,
    static_autoregressive_generate,
    static_speculative_generate,
    weights_from_hf,
)
from lib.decoding.gemv import MEASURED
from lib.models import load_model, load_tokenizer

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA)")]
NEW = 24


@pytest.fixture(scope="module")
def cuda_pair(tiny_models):
    target = load_model(tiny_models.target, "float32", "cuda")
    draft = load_model(tiny_models.draft, "float32", "cuda")
    tokenizer = load_tokenizer(tiny_models.target)
    return target, draft, tokenizer


@pytest.fixture(scope="module")
def prompts(cuda_pair, shipped_prompts):
    return [cuda_pair[2].encode(p)[:20] for p in shipped_prompts[:4]]


def fast_decoder(model, batch, gamma=0, **options):
    max_len = max_len_for(batch, NEW, gamma)
    return StaticDecoder(weights_from_hf(model, max_len), len(batch), max_len, **options)


@pytest.mark.parametrize("rows", [1, 4])
def test_cuda_graphs_and_compile_give_the_plain_path_tokens(cuda_pair, prompts, rows):
    target, _, _ = cuda_pair
    batch = prompts[:rows]
    plain = autoregressive_generate(target, batch, NEW).tokens
    graphed = fast_decoder(target, batch)  # CUDA defaults: graphs on, layers compiled
    assert graphed.use_graphs
    assert static_autoregressive_generate(graphed, batch, NEW).tokens == plain
    assert graphed.graphs, "no CUDA graph was captured"
    eager = fast_decoder(target, batch, use_graphs=False, compile_layers=False)
    assert static_autoregressive_generate(eager, batch, NEW).tokens == plain


@pytest.mark.parametrize("option", ["pdl", "pick_in_graph", "pick_kernel"])
@pytest.mark.parametrize("rows", [1, 2])
def test_launch_choices_change_no_token(tiny_models, shipped_prompts, rows, option):
    """In bfloat16 the batch-1 steps run lib/decoding/gemv.py's and decode_attention.py's kernels; launched with
    PDL (where the GPU has it) each kernel starts before the one it reads has finished and waits for it inside.
    A missing wait would read stale values. With the greedy pick inside the step's graph, the token that the
    next step reads is the graph's own output, overwritten by every replay: a copy queued in the wrong order
    would feed or report another step's token. lib/decoding/pick.py's kernel must pick what torch's argmax and
    topk do. Either way the greedy tokens, AR and SD, and AR's top-2 figures must equal those of the choice
    switched off bit for bit (same kernels, only launches and their order differ). Not `gate_epilogue`:
    its kernel computes the compiled unfused step's bits (`test_gate_epilogue_is_the_compiled_unfused_mlp_bit_for_bit`),
    but an eager prefill of up to 16 tokens (13 here at one row) takes it too, where the unfused ops round SiLU(gate)
    to 16 bits before the product with up."""
    from lib.decoding import fast_path
    model = load_model(tiny_models.target, "bfloat16", "cuda")
    tokenizer = load_tokenizer(tiny_models.target)
    batch = [tokenizer.encode(p)[:20] for p in shipped_prompts[:rows]]
    max_len = max_len_for(batch, 3 * NEW, 3)
    weights = weights_from_hf(model, max_len)
    shipped, tokens = fast_path.options(), {}
    try:
        for on in (False, True):
            fast_path.set_options(**{option: on})
            ar = static_autoregressive_generate(StaticDecoder(weights, rows, max_len), batch, 3 * NEW)
            sd = static_speculative_generate(StaticDecoder(weights, rows, max_len),
                                             StaticDecoder(weights.first_layers(2), rows, max_len), batch, 3 * NEW, 3)
            tokens[on] = (ar.tokens, ar.top2_margins, ar.top_logits, sd.tokens)
    finally:
        fast_path.set_options(**shipped)
    assert tokens[True] == tokens[False]


@pytest.mark.parametrize("rows,gamma", [(1, 4), (4, 3)])
def test_sd_rounds_read_through_pinned_memory_are_lossless(cuda_pair, prompts, rows, gamma):
    target, draft, _ = cuda_pair
    batch = prompts[:rows]
    plain = autoregressive_generate(target, batch, NEW).tokens
    gen = static_speculative_generate(fast_decoder(target, batch, gamma), fast_decoder(draft, batch, gamma),
                                      batch, NEW, gamma)
    assert gen.tokens == plain
    assert sum(gen.num_drafts) > 0 and all(sum(p) == a for p, a in zip(gen.accepted_per_position,
                                                                            gen.accepted_tokens))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_separate_placement_puts_target_and_draft_on_two_gpus_and_stays_lossless(tiny_models, shipped_prompts):
    from lib.engines import create_engine
    from lib.models import resolve_models
    from lib.types import Clock, Request
    cfg = C.resolve(environ={"GPU_STRATEGY": "separate", "DTYPE": "float32", "GENERATION_LENGTH": str(NEW)})
    models = resolve_models(cfg, need_draft=True)
    tokenizer = load_tokenizer(models.target)
    requests = [Request(i, p, tokenizer.encode(p)[:20], NEW) for i, p in enumerate(shipped_prompts[:2])]
    tokens = {}
    for method in ("target", "speculative"):
        engine = create_engine("hf", cfg, method, models)
        engine.start()
        facts = engine.describe()["placement"]
        records = []
        engine.run(requests, Clock(), records.append)
        tokens[method] = [r.output_ids for r in sorted(records, key=lambda r: r.request_id)]
        engine.stop()
        if method == "speculative":
            assert str(facts["target"]).startswith("cuda:0") and str(facts["draft"]).startswith("cuda:1"), facts
    assert tokens["speculative"] == tokens["target"]


def step_kernels(decoder: StaticDecoder, tokens: torch.Tensor) -> set[str]:
    """The names of the CUDA kernels one replay of the step's graph runs."""
    from torch.profiler import ProfilerActivity, profile
    decoder.step(tokens)  # capture
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decoder.step(tokens)
        torch.cuda.synchronize()
    return {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}


@pytest.mark.parametrize("batch,width", [(2, 1), (1, 4)])
def test_steps_of_a_few_rows_take_the_few_row_kernel(tiny_models, batch, width):
    """In bfloat16 a decode step of 2 rows and a verify step of 4 tokens run their products on gemv.py's few-row
    kernel and none on cuBLAS (the tiny target's K are multiples of 64); with gemv_rows=1 they go back to cuBLAS."""
    from lib.decoding import fast_path
    weights = weights_from_hf(load_model(tiny_models.target, "bfloat16", "cuda"), 64)
    tokens = torch.ones(batch, width, dtype=torch.long, device="cuda")
    shipped, names = fast_path.options(), {}
    try:
        for rows in (shipped["gemv_rows"], 1):
            fast_path.set_options(gemv_rows=rows)
            names[rows] = step_kernels(StaticDecoder(weights, batch, 64), tokens)
    finally:
        fast_path.set_options(**shipped)
    blas = ("gemm", "nvjet", "cublas", "cutlass", "xmma")
    few_rows, one_row_only = names[shipped["gemv_rows"]], names[1]
    assert any("gemv_few_rows" in n for n in few_rows), sorted(few_rows)
    assert not any(key in n.lower() for n in few_rows for key in blas), sorted(few_rows)
    assert not any("gemv_few_rows" in n for n in one_row_only)
    assert any(key in n.lower() for n in one_row_only for key in blas), sorted(one_row_only)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 5, 16])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (1000, 512), (37888, 3584), (896, 896), (64, 64),
                                 *MEASURED])
def test_gemv_kernels_equal_a_float64_product(n, k, rows, pdl, gated):
    """lib/decoding/gemv.py's one-row and few-row kernels against a float64 reference on fresh random data (a
    ragged N, a K that is not a multiple of 256, a K of one chunk and the blocks of `MEASURED` included), launched
    plainly and with PDL where the GPU has it, and (gated) ending in SiLU(gate) * up with w's rows in (gate, up)
    pairs; more than MAX_ROWS rows go to cuBLAS."""
    from lib.decoding import gemv
    w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") / k ** 0.5
    x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
    assert gemv.supports(x, w) and not gemv.supports(torch.cat([x] * 17), w)
    out = gemv.silu_gate(x, w, pdl=pdl) if gated else gemv.linear(x, w, pdl=pdl)
    ref = x.double() @ w.double().T
    if gated:
        ref = torch.nn.functional.silu(ref[:, 0::2]) * ref[:, 1::2]
    assert out.shape == ref.shape == (rows, n // 2 if gated else n) and torch.isfinite(out).all()
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.parametrize("rows,vocab", [(1, 128256), (16, 128256), (5, 151936), (2, 32000), (3, 700)])
def test_greedy_pick_kernel_equals_torch_argmax_and_top2(rows, vocab):
    """lib/decoding/pick.py on the GPU against torch.argmax and chain.top2 on the same bf16 logits, three launches
    in a row (the per-row counts start at zero again): random rows, rows with the largest logit twice (one part,
    two parts, the ragged end; bf16's coarse values make such ties common in real runs too) and strided rows."""
    from lib.decoding import pick
    from lib.decoding.chain import top2
    torch.manual_seed(rows + vocab)
    logits = (torch.randn(rows, 2, vocab, device="cuda") * 4).to(torch.bfloat16)
    top = logits.max() + 1
    logits[0, -1, [1, min(7, vocab - 1)]] = top
    logits[-1, -1, [vocab // 3, vocab - 1]] = top
    last = logits[:, -1]
    assert pick.supports(last) and not pick.supports(last.cpu())
    runs = [pick.greedy_top2(last, pdl=pdl) for pdl in (False, True, False)]
    for token, tops in runs:
        assert torch.equal(token, last.argmax(-1)) and torch.equal(tops, top2(last))
    assert runs[0][0][0].item() == 1 and runs[0][1][0, 0].item() == 0.0


@pytest.mark.parametrize("rows", [1, 2, 5])
@pytest.mark.parametrize("n,k", [(768, 128), (384, 64), (16384, 2048), (28672, 4096)])
def test_gate_epilogue_is_the_compiled_unfused_mlp_bit_for_bit(n, k, rows):
    """SiLU(gate) * up in the product's epilogue against the unfused path of a compiled step (the same product
    stored, then torch.compile's SiLU(gate) * up kernel), on the tiny models' and the 1B/8B Llama gate/up shapes:
    the same bits (the same rounded products, the same float32 operations). An eager step's SiLU rounds to 16
    bits before the product with up, so there the two may differ by a rounding."""
    from lib.decoding import gemv

    def unfused(y):
        gate, up = y.unflatten(-1, (-1, 2)).unbind(-1)
        return torch.nn.functional.silu(gate) * up

    torch._dynamo.reset()  # one compilation per case, under any recompile limit
    torch.manual_seed(n + k + rows)
    w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") / k ** 0.5
    x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
    ref = torch.compile(unfused, dynamic=False, fullgraph=True)(gemv.launch(x, w))
    out = gemv.silu_gate(x, w)
    assert out.shape == ref.shape == (rows, n // 2)
    assert torch.equal(out, ref), f"{(out != ref).sum().item()} of {out.numel()} values differ"


@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("batch,n", [(1, 1), (4, 1), (16, 1), (2, 5)])
def test_decode_attention_kernel_equals_the_eager_one_in_float64(batch, n, pdl):
    """lib/decoding/decode_attention.py in bfloat16 on an 8B layer's shape (32 query heads, 8 kv heads, head_dim
    128, a 448-column cache), rows at different positions, against the eager attention it replaces run in float64;
    the fast path sends it steps of up to 8 tokens (decode, draft and verify steps). Under 64 (row, kv head) pairs
    the columns are split over programs whose last merges: the last row sees the whole cache (every split has
    columns), and three launches in a row must agree bit for bit (the counts the merge waits on start at zero
    again each launch)."""
    from lib.decoding import decode_attention
    from lib.decoding.fast_path import Arch, attention
    q = torch.randn(batch, n, 32, 128, dtype=torch.bfloat16, device="cuda")
    k, v = (torch.randn(batch, 8, 448, 128, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    first = torch.randint(0, 448 - n, (batch, 1), device="cuda")
    first[-1] = 448 - n
    positions = first + torch.arange(n, device="cuda")
    assert decode_attention.supports(q, k) == (n == 1) and decode_attention.supports(q, k, 8)
    runs = [decode_attention.launch(q, k, v, positions, 128 ** -0.5, pdl).flatten(2) for _ in range(3)]
    assert all(torch.equal(run, runs[0]) for run in runs[1:])
    out = runs[0]
    arch = Arch(32, 8, 128, eps=1e-6, scale=128 ** -0.5, act=None)
    ref = attention(q.double(), k.double(), v.double(), positions, arch)  # float64: not the kernel's
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2
