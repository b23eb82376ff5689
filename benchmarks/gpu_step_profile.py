"""Where one decode step of the fast path goes on a GPU: per kernel, against the bandwidth floor.

One run, one process, random-init 8B-class shape of one family (gpu_decode.py's shapes), bf16:
1. the step's time (CUDA-graph replays, median; a one-token step with greedy AR's pick, as the AR loop runs it)
   and % of the floor (copy bandwidth / weight bytes per step);
2. the same graph queued back to back (still, and moving the lengths as the AR loop does), and the whole call;
3. torch.profiler over graph replays: every kernel's time per step, grouped (matrix products, attention, the
   small fused ops), so the gap to the floor has names;
4. each weight matrix's product alone (cuBLAS through F.linear, and lib/decoding/gemv.py's Triton kernel), over
   enough copies of the matrix that the L2 cache does not serve it, in % of copy bandwidth.

    python benchmarks/gpu_step_profile.py --arch llama --batches 1,16 --out docs/perf/h200_profile_<date>.json
"""
from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import lib.environment  # noqa: E402,F401  (first: a package this Python lacks is one line, not a traceback)

# isort: split

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.gpu_decode import ARCHS, build_model, number_list  # noqa: E402
from lib.bandwidth import copy_bandwidth  # noqa: E402
from lib.decoding import fast_path  # noqa: E402
from lib.files import write_json  # noqa: E402

SHIPPED = fast_path.options()
BEFORE_EPILOGUE = {**SHIPPED, "gate_epilogue": False, "pick_kernel": False}
EARLIER = {**BEFORE_EPILOGUE, "attention": False, "attention_width": 1, "pdl": False, "combo": False,
           "pick_in_graph": False, "attention_splits": 1}
VARIANTS = {"inductor": {**EARLIER, "gemv": False, "tune": True},  # torch.compile's own kernels, tuned per process
            "inductor-untuned": {**EARLIER, "gemv": False, "tune": False},
            "gemv": {**EARLIER, "gemv": True, "tune": True},  # lib/decoding/gemv.py for batch-1 products
            "gemv-untuned": {**EARLIER, "gemv": True, "tune": False},
            "attention": {**EARLIER, "attention": True},  # + lib/decoding/decode_attention.py
            "pdl": {**EARLIER, "attention": True, "pdl": True},  # + lib/decoding/triton_launch.py
            "pdl-combo": {**EARLIER, "attention": True, "pdl": True, "combo": True},  # + inductor's combo kernels
            "pick-on-host": {**BEFORE_EPILOGUE, "pick_in_graph": False, "attention_splits": 1},  # + attention up to 8
            "one-split": {**BEFORE_EPILOGUE, "attention_splits": 1},  # + greedy AR's argmax and top2 inside the graph
            "cublas-rows": {**BEFORE_EPILOGUE, "gemv_rows": 1},  # + the attention's columns split over 4 programs
            "gate-unfused": BEFORE_EPILOGUE,  # + products of 2-16 rows through gemv.py's tensor-core kernel, with PDL
            "pick-torch": {**SHIPPED, "pick_kernel": False},  # + a SiLU MLP's SiLU(gate) * up in its gate/up epilogue
            "shipped": SHIPPED}  # + greedy AR's argmax and top2 in lib/decoding/pick.py's one kernel
GROUPS = (("gemv/gemm", ("gemv", "gemm", "cutlass", "xmma", "sm90", "splitk", "_gemv_kernel", "cublas")),
          ("attention", ("bmm", "softmax", "attention", "flash")),
          ("fused small ops (triton)", ("triton",)),)


def group_of(name: str) -> str:
    lower = name.lower()
    for group, keys in GROUPS:
        if any(key in lower for key in keys):
            return group
    return "other"


def replay_ms(fn, repeats: int = 200) -> float:
    """Median of CUDA-event timings of fn (each a graph replay or a kernel)."""
    for _ in range(10):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def back_to_back_ms(decoder, tokens, moving: bool, replays: int = 64) -> float:
    """ms per step of `replays` steps queued at once and timed by two events: the captured graph alone, replayed
    with nothing between (moving=False, every replay at the same columns), or as the AR loop queues it (the token
    copy, the replay, the lengths moved one column). Against `replay_ms` (one timed replay at a time) and the whole
    call, it says whether the time between tokens is inside the graph or between graphs."""
    then = fast_path.ar_step_then(width=tokens.shape[1])
    graph = decoder.graphs[(tokens.shape[1], then)][0]
    start_lengths, one = decoder.lengths.clone(), torch.ones_like(decoder.lengths)

    def run():
        for _ in range(replays):
            if moving:
                decoder.step(tokens, then)
                decoder.lengths.add_(one)
            else:
                graph.replay()
        decoder.lengths.copy_(start_lengths)
    run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


def decoder_for(weights, batch: int, prompt_len: int, new_tokens: int, vocab: int, width: int = 1):
    """A decoder sized as whole_call's (the same compiled kernels), prefilled, its step of `width` tokens per row
    (1: AR; k + 1: an SD verify step) captured."""
    prompt = torch.randint(1, vocab, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    decoder = fast_path.StaticDecoder(weights, batch, fast_path.max_len_for([prompt] * batch, new_tokens, 4))
    decoder.prefill([prompt] * batch)
    tokens = torch.randint(1, vocab, (batch, width), device=decoder.device)
    decoder.step(tokens, fast_path.ar_step_then(width=width))  # capture
    return decoder, tokens


def whole_call(weights, batch: int, prompt_len: int, new_tokens: int, vocab: int, floor_ms: float) -> dict:
    """gpu_decode.py's measure: static_autoregressive_generate's decode rate, and the gaps between tokens."""
    prompt = torch.randint(1, vocab, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    prompts = [prompt] * batch
    decoder = fast_path.StaticDecoder(weights, batch, fast_path.max_len_for(prompts, new_tokens, 4))
    fast_path.static_autoregressive_generate(decoder, prompts, new_tokens)  # capture
    gen = fast_path.static_autoregressive_generate(decoder, prompts, new_tokens)
    times = gen.token_times[0]
    gaps = sorted(1e3 * (b - a) for a, b in zip(times, times[1:]))
    rate_steps = (len(times) - 1) / (times[-1] - times[0])
    return {"decode_steps_s": rate_steps, "pct_floor": 100 * floor_ms * rate_steps / 1e3,
            "gap_ms_median": gaps[len(gaps) // 2], "gap_ms_p90": gaps[int(0.9 * len(gaps))], "gap_ms_max": gaps[-1],
            "tokens_sha1": hashlib.sha1(json.dumps(gen.tokens).encode()).hexdigest()}


def kernel_profile(decoder, tokens, steps: int = 20) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            decoder.step(tokens, fast_path.ar_step_then(width=tokens.shape[1]))
        torch.cuda.synchronize()
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = per_kernel[event.name]
            entry[0] += event.device_time / steps
            entry[1] += 1 / steps
    rows = [{"kernel": name, "us_per_step": us, "per_step": count, "group": group_of(name)}
            for name, (us, count) in per_kernel.items()]
    return sorted(rows, key=lambda r: -r["us_per_step"])


def gemv_candidates(rows: int):
    from lib.decoding.gemv import Blocks
    if rows > 1:
        return [Blocks(n, k, w, st) for n, k, w, st in ((32, 256, 4, 4), (32, 256, 4, 6), (32, 128, 4, 6),
                                                       (64, 128, 4, 4), (64, 128, 4, 6), (64, 64, 4, 3),
                                                       (128, 128, 4, 3), (128, 64, 8, 3))]
    return [Blocks(n, k, w, st) for n, k, w, st in ((4, 1024, 4, 3), (8, 512, 4, 3), (8, 1024, 8, 3),
                                                   (16, 256, 4, 4), (16, 512, 8, 3), (2, 2048, 8, 2),
                                                   (4, 512, 4, 4), (8, 256, 4, 4), (4, 256, 4, 4), (2, 512, 4, 4))]


def product_us(fn, x, copies, blocks, per_graph: int = 24) -> float:
    """Median µs of one product: a CUDA graph of per_graph products cycling through copies of the matrix (so L2
    does not hold it and launch gaps are those of a graph, as in a decode step)."""
    def products():
        for i in range(per_graph):
            w = copies[i % len(copies)]
            fn(x, w, blocks) if blocks else fn(x, w)
    products()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        products()
    return replay_ms(graph.replay, 30) * 1e3 / per_graph


def matrix_rows(weights, batch: int, bandwidth: float, l2_bytes: int) -> list[dict]:
    """Each distinct weight shape's product alone for `batch` rows of x: cuBLAS, and up to gemv.MAX_ROWS rows
    lib/decoding/gemv.py's kernel with each candidate block shape, and with the shipped one launched with PDL (a
    chain of products that overlap, as in a step)."""
    from lib.decoding import gemv
    layer = weights.layers[0]
    mats = {"wqkv": layer.wqkv, "wo": layer.wo, "w13": layer.w13, "w2": layer.w2, "lm_head": weights.lm_head}
    rows = []
    for name, w in mats.items():
        copies = [w] + [torch.randn_like(w) for _ in range(max(0, 3 * l2_bytes // w.nbytes))]
        x = torch.randn(batch, w.shape[1], dtype=w.dtype, device=w.device)
        floor_us = w.nbytes / bandwidth * 1e6
        row = {"matrix": name, "shape": list(w.shape), "batch": batch, "MB": w.nbytes / 1e6, "floor_us": floor_us}
        ref = F.linear(x, w).float()
        on_gemv = batch <= gemv.MAX_ROWS
        shipped = gemv.blocks_for(w.shape[0], w.shape[1], batch)
        candidates = [("cublas", F.linear, None)] + [(f"triton{tuple(b)}", gemv.launch, b) for b in
                                                     gemv_candidates(batch) if on_gemv and w.shape[1] % b.block_k == 0]
        if on_gemv:
            candidates.append(("shipped-pdl", functools.partial(gemv.launch, pdl=True), shipped))
        for impl, fn, blocks in candidates:
            us = product_us(fn, x, copies, blocks)
            out = fn(x, w, blocks) if blocks else fn(x, w)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            row[impl] = {"us": us, "pct": 100 * floor_us / us, "err": err}
        row["cublas_pct"] = row["cublas"]["pct"]
        line = (f"  {name:8s} {str(tuple(w.shape)):16s} B={batch:2d} floor {floor_us:7.1f} us | cuBLAS "
                f"{row['cublas_pct']:5.1f} %")
        if on_gemv:
            best = max((key for key in row if key.startswith("triton")), key=lambda key: row[key]["pct"])
            row["triton_best"], row["triton_pct"] = best, row[best]["pct"]
            line += (f" | shipped triton {row.get(f'triton{tuple(shipped)}', {}).get('pct', 0):5.1f} %, with PDL "
                     f"{row['shipped-pdl']['pct']:5.1f} % | best {best} {row['triton_pct']:5.1f} % "
                     f"(rel err {row[best]['err']:.1e})")
        print(line)
        rows.append(row)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="llama", choices=sorted(ARCHS))
    p.add_argument("--shape", default="", help="default: the family's target shape")
    p.add_argument("--batches", default="1,16", type=number_list())
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--widths", default="1", type=number_list(int, "1,5"),
                   help="tokens per row of the timed step, comma list (5: a k = 4 verify)")
    p.add_argument("--matrix-rows", default="1", type=number_list(int, "1,5"),
                   help="rows of x for the products timed alone, comma list")
    p.add_argument("--no-matrices", action="store_true")
    p.add_argument("--no-steps", action="store_true", help="time the products alone only")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: {', '.join(unknown)} unknown; choose from {', '.join(VARIANTS)}")
    if not torch.cuda.is_available():
        p.error("needs an NVIDIA GPU (CUDA): it times CUDA-graph replays and CUDA kernels "
                "(benchmarks/gpu_decode.py --tiny runs on a CPU)")
    device = torch.device("cuda")
    shape = args.shape or ARCHS[args.arch].targets.split(",")[0]
    bandwidth = copy_bandwidth(device, 2 << 30)
    props = torch.cuda.get_device_properties(device)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    print(f"device {props.name}; copy bandwidth {bandwidth / 1e9:.0f} GB/s; L2 {l2 >> 20} MiB; "
          f"torch {torch.__version__}")
    model = build_model(args.arch, shape, torch.bfloat16, device, 0)
    weights = fast_path.weights_from_hf(model, args.prompt_len + args.new_tokens + 32)
    floor_ms = weights.nbytes() / bandwidth * 1e3
    print(f"{args.arch}-{shape}: {weights.nbytes() / 1e9:.2f} GB per step, floor {floor_ms:.3f} ms")
    out = {"schema": "speclab.gpu_step_profile/1", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "device": props.name, "torch": torch.__version__, "copy_bandwidth_gb_s": bandwidth / 1e9,
           "arch": args.arch, "shape": shape, "floor_ms": floor_ms, "steps": [], "matrices": []}
    for rows in [] if args.no_matrices else [int(r) for r in args.matrix_rows.split(",")]:
        out["matrices"] += matrix_rows(weights, rows, bandwidth, l2)
        if args.out:
            write_json(Path(args.out), out)
    steps = [] if args.no_steps else [(int(b), int(n)) for b in args.batches.split(",")
                                      for n in args.widths.split(",")]
    for batch, width in steps:
        for variant in args.variants.split(","):
            fast_path.set_options(**VARIANTS[variant])
            decoder, tokens = decoder_for(weights, batch, args.prompt_len, args.new_tokens,
                                          model.config.vocab_size, width)
            ms = replay_ms(functools.partial(decoder.step, tokens, fast_path.ar_step_then(width=width)))
            queued = {"still": back_to_back_ms(decoder, tokens, moving=False),
                      "moving": back_to_back_ms(decoder, tokens, moving=True)}
            kernels = kernel_profile(decoder, tokens)
            groups = defaultdict(float)
            for row in kernels:
                groups[row["group"]] += row["us_per_step"]
            busy = sum(groups.values()) / 1e3
            print(f"\n{variant} B={batch} width {width}: step {ms:.3f} ms = {100 * floor_ms / ms:.1f} % of floor; "
                  f"kernels busy {busy:.3f} ms ({sum(r['per_step'] for r in kernels):.0f} launches), "
                  f"idle {ms - busy:.3f} ms; queued back to back {queued['still']:.3f} ms a step "
                  f"({queued['moving']:.3f} moving the lengths, as the AR loop does)")
            for group, us in sorted(groups.items(), key=lambda g: -g[1]):
                print(f"  {group:26s} {us:8.1f} us")
            for row in kernels[:10]:
                print(f"    {row['us_per_step']:8.1f} us x{row['per_step']:5.1f}  {row['kernel'][:100]}")
            call = (whole_call(weights, batch, args.prompt_len, args.new_tokens, model.config.vocab_size, floor_ms)
                    if width == 1 else None)
            if call:
                first = next((s["whole_call"] for s in out["steps"] if s["batch"] == batch and s["whole_call"]), call)
                same = "the same as" if call["tokens_sha1"] == first["tokens_sha1"] else "NOT the same as"
                print(f"  whole call ({args.new_tokens} tokens): {call['pct_floor']:.1f} % of floor; gaps between "
                      f"tokens median {call['gap_ms_median']:.3f} ms, p90 {call['gap_ms_p90']:.3f}, "
                      f"max {call['gap_ms_max']:.3f}; greedy tokens {same} the first variant's")
            out["steps"].append({"variant": variant, "batch": batch, "width": width, "step_ms": ms,
                                 "pct_floor": 100 * floor_ms / ms, "back_to_back_ms": queued, "whole_call": call,
                                 "kernels_busy_ms": busy, "groups_us": dict(groups), "kernels": kernels[:60]})
            del decoder
            torch.cuda.empty_cache()
            if args.out:
                write_json(Path(args.out), out)
    return out


if __name__ == "__main__":
    main()
