"""The payoff map (payoff_map.py, lib/payoff.py): break-even and best k on hand-computed cells; a real map of the
tiny models (hf, 2 rates x 2 k), stopped by SIGTERM after its first pair of cells, reported partially, resumed,
its JSON checked against the run folders, its heat-map PNG and its HTML rendered in headless Chromium; bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import wait_for

from lib.errors import UsageError
from lib.files import ROOT
from lib.payoff import FIGURE_BY_KEY, Grid, analyse, best_k, break_even, break_even_text, cell_id, cells_of

TPOT, THROUGHPUT = FIGURE_BY_KEY["tpot"], FIGURE_BY_KEY["throughput"]


# ---------------------------------------------------------------- hand-computed cells

def test_break_even_interpolates_where_the_ratio_crosses_one():
    # TPOT ratios 0.8, 0.9, 1.2 at 1, 2, 4 req/s: 1 is crossed between 2 and 4, at 2 + 0.1 / 0.3 * 2 = 2.667
    result = break_even([(4, 1.2), (1, 0.8), (2, 0.9)], TPOT)  # any order
    assert result["verdict"] == "crosses" and result["pays_at"] == [1, 2]
    (crossing,) = result["crossings"]
    assert crossing["direction"] == "stops paying" and crossing["between"] == [2, 4]
    assert crossing["load"] == pytest.approx(2 + 0.1 / 0.3 * 2)
    assert break_even_text(result, "req/s") == "stops paying at 2.67 req/s (between 2 and 4)"
    # throughput ratios 0.9 -> 1.1 between 1 and 3: SD starts paying off at 2
    (up,) = break_even([(1, 0.9), (3, 1.1)], THROUGHPUT)["crossings"]
    assert up["direction"] == "starts paying" and up["load"] == pytest.approx(2.0)


def test_break_even_everywhere_nowhere_twice_and_exactly_one():
    assert break_even([(1, 0.5), (8, 0.99)], TPOT)["verdict"] == "everywhere"
    assert break_even_text(break_even([(1, 0.5), (8, 0.99)], TPOT), "x") == "pays off everywhere on this grid"
    assert break_even_text(break_even([(1, 1.5), (8, 1.01)], TPOT), "x") == "pays off nowhere on this grid"
    assert break_even([], TPOT)["verdict"] == "no data"
    assert break_even([(1, 1.0)], TPOT)["verdict"] == "nowhere"  # an even ratio does not pay off
    twice = break_even([(1, 1.2), (2, 0.8), (4, 0.8), (8, 1.6)], TPOT)
    assert [(c["direction"], round(c["load"], 6)) for c in twice["crossings"]] == [
        ("starts paying", 1.5), ("stops paying", 4 + 0.2 / 0.8 * 4)]
    # a throughput ratio of 1.0 at 2 (not paying) and 1.5 at 4: the crossing sits exactly on the grid point 2
    assert break_even([(2, 1.0), (4, 1.5)], THROUGHPUT)["crossings"][0]["load"] == pytest.approx(2.0)


def test_best_k_picks_the_best_ratio_the_smaller_k_on_a_tie_and_says_when_none_pays():
    assert best_k([(2, 0.9), (4, 0.8), (6, 0.8)], TPOT) == {"k": 4, "ratio": 0.8, "pays": True}
    assert best_k([(2, 1.3), (4, 1.7)], THROUGHPUT) == {"k": 4, "ratio": 1.7, "pays": True}
    assert best_k([(2, 0.9), (4, 0.95)], THROUGHPUT) == {"k": 4, "ratio": 0.95, "pays": False}
    assert best_k([], TPOT) == {"k": None, "ratio": None, "pays": None}


def test_analyse_keeps_batch_sizes_apart_and_leaves_missing_cells_out():
    grid = Grid(engine="hf", load="concurrency", loads=[1, 4], ks=[2, 4], batch_sizes=[1, 8])
    ratios = {(1, 1, 2): 0.7, (1, 4, 2): 1.1, (1, 1, 4): 0.6, (1, 4, 4): 0.9,  # (batch, load, k): TPOT ratio
              (8, 1, 2): 1.2, (8, 4, 2): 1.3, (8, 1, 4): 0.95}                # (8, 4, 4) did not finish
    cells = [{"batch": b, "load": x, "k": k, "ratios": {"tpot": r, "throughput": None, "goodput": None,
                                                        "energy": None}} for (b, x, k), r in ratios.items()]
    breaks, bests = analyse(grid, cells)
    tpot = {(row["batch"], row["k"]): row["tpot"] for row in breaks}
    assert tpot[(1, 2)]["crossings"][0]["load"] == pytest.approx(1 + 0.3 / 0.4 * 3)
    assert tpot[(1, 4)]["verdict"] == "everywhere" and tpot[(8, 2)]["verdict"] == "nowhere"
    assert tpot[(8, 4)]["verdict"] == "everywhere" and tpot[(8, 4)]["pays_at"] == [1]  # one cell only
    assert all(row["throughput"]["verdict"] == "no data" for row in breaks)
    best = {(row["batch"], row["load"]): row["tpot"] for row in bests}
    assert best[(1, 1)]["k"] == 4 and best[(1, 4)] == {"k": 4, "ratio": 0.9, "pays": True, "text": "k=4 (0.9)"}
    assert best[(8, 4)]["text"] == "AR: no k pays off (best k=2 at 1.3)"


# ---------------------------------------------------------------- a real map of the tiny models

RATES, KS = [2.0, 5.0], [2, 3]
GRID_ARGS = ["--rates", "2,5", "--duration", "2", "--k", "2,3", "--set", "GENERATION_LENGTH=6",
             "--set", "PROMPT_FILE=prompts/prompt_small.txt", "--set", "GOODPUT=e2el:600000"]


def payoff_map(*args, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "payoff_map.py", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def statuses(folder: Path) -> dict:
    try:
        return {c["id"]: c["status"] for c in json.loads((folder / "sweep.json").read_text())["combos"]}
    except (OSError, ValueError):
        return {}




@pytest.fixture(scope="module")
def tiny_map(tmp_path_factory, tiny_models):
    """The map started, a second start refused while it runs, SIGTERM once its first AR and SD cells are done,
    then --resume (the grid flags left out)."""
    out = tmp_path_factory.mktemp("payoff") / "map"
    first = subprocess.Popen([sys.executable, "payoff_map.py", *GRID_ARGS, "--out", str(out)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(lambda: statuses(out).get(cell_id("sd", 2.0, None, 3)) == "running", 600, "the third cell")
        second = payoff_map(*GRID_ARGS, "--out", out, timeout=120)
        os.kill(first.pid, signal.SIGTERM)
        _, stopped_err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    partial = json.loads((out / "payoff.json").read_text())
    kept = {c: (out / c / "run.json").stat().st_mtime_ns for c in ("ar__load-2", "sd__load-2__k-2")}
    refused = payoff_map(*GRID_ARGS, "--out", out, timeout=120)
    resumed = payoff_map("--out", out, "--resume")
    return {"out": out, "stopped_rc": first.returncode, "stopped_err": stopped_err, "second": second,
            "partial": partial, "kept": kept, "refused": refused, "resumed": resumed,
            "final": json.loads((out / "payoff.json").read_text())}


def test_a_second_start_is_refused_while_the_map_runs(tiny_map):
    second = tiny_map["second"]
    assert second.returncode == 75 and "another sweep is running" in second.stderr, second.stderr[-2000:]
    assert "payoff map into" in second.stderr


def test_sigterm_keeps_the_finished_cells_and_reports_them(tiny_map):
    assert tiny_map["stopped_rc"] == 130, tiny_map["stopped_err"][-3000:]
    partial = tiny_map["partial"]
    assert partial["cells_total"] == 6 and partial["cells_done"] == 2
    (cell,) = partial["cells"]
    assert cell["cell"] == "sd__load-2__k-2" and cell["ratios"]["tpot"] is not None
    missing = {m["cell"]: m["why"] for m in partial["not_done"]}
    assert set(missing) == {"sd__load-2__k-3", "ar__load-5", "sd__load-5__k-2", "sd__load-5__k-3"}
    refused = tiny_map["refused"]
    assert refused.returncode == 2 and "already holds a payoff map: --resume finishes it" in refused.stderr


def test_resume_runs_only_the_rest(tiny_map):
    resumed = tiny_map["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "done on an earlier run, skipped (--resume)" in resumed.stderr + resumed.stdout
    out = tiny_map["out"]
    assert {c: (out / c / "run.json").stat().st_mtime_ns for c in tiny_map["kept"]} == tiny_map["kept"]
    assert set(statuses(out).values()) == {"ok"}


def mode_metrics(run_dir: Path, mode: str) -> dict:
    return json.loads((run_dir / "benchmark_results.json").read_text())["modes"][mode]["metrics"]


def test_every_cell_has_its_ratios_from_the_run_folders(tiny_map):
    final, out = tiny_map["final"], tiny_map["out"]
    assert final["cells_done"] == final["cells_total"] == 6 and final["not_done"] == []
    cells = {(c["load"], c["k"]): c for c in final["cells"]}
    assert set(cells) == {(x, k) for x in RATES for k in KS}
    for (load, k), cell in cells.items():
        sd = mode_metrics(out / cell_id("sd", load, None, k), "hf:speculative")
        ar = mode_metrics(out / cell_id("ar", load, None), "hf:target")
        assert cell["ratios"]["tpot"] == pytest.approx(sd["latency"]["mean_tpot_ms"] / ar["latency"]["mean_tpot_ms"])
        assert cell["ratios"]["throughput"] == pytest.approx(sd["output_throughput"] / ar["output_throughput"])
        assert cell["ratios"]["goodput"] == pytest.approx(sd["request_goodput"] / ar["request_goodput"])
        assert cell["ratios"]["energy"] is None and cell["energy_note"]  # no GPU here
        assert cell["same_arrivals"] and cell["requests"] == sd["completed"] > 0
        assert 0 < cell["acceptance_rate"] <= 1
    # more load, more requests on the same seeded schedule
    assert cells[(5.0, 2)]["requests"] > cells[(2.0, 2)]["requests"]
    assert final["different_arrivals"] == []


def test_break_even_and_best_k_agree_with_the_cells(tiny_map):
    final = tiny_map["final"]
    cells = {(c["load"], c["k"]): c["ratios"] for c in final["cells"]}
    for row in final["break_even"]:
        for key, figure in (("tpot", TPOT), ("throughput", THROUGHPUT)):
            (x0, r0), (x1, r1) = [(x, cells[(x, row["k"])][key]) for x in RATES]
            pays = [figure.pays(r0), figure.pays(r1)]
            verdict = row[key]["verdict"]
            if all(pays):
                assert verdict == "everywhere"
            elif not any(pays):
                assert verdict == "nowhere"
            else:
                (crossing,) = row[key]["crossings"]
                assert verdict == "crosses" and x0 < crossing["load"] < x1
                assert crossing["load"] == pytest.approx(x0 + (1 - r0) * (x1 - x0) / (r1 - r0))
    for row in final["best_k"]:
        tpots = {k: cells[(row["load"], k)]["tpot"] for k in KS}
        best = min(KS, key=lambda k: (tpots[k], k))
        assert row["tpot"]["k"] == best and row["tpot"]["pays"] == (tpots[best] < 1)
        throughputs = {k: cells[(row["load"], k)]["throughput"] for k in KS}
        assert row["throughput"]["k"] == max(KS, key=lambda k: (throughputs[k], -k))


def test_heatmap_is_a_png_and_the_html_shows_it_in_chromium(tiny_map, chromium_render):
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image

    out, final = tiny_map["out"], tiny_map["final"]
    png = out / final["heatmap"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    dom, images, pixels = chromium_render(out / "payoff.html", height=2400)
    (image,) = images
    assert image.size == Image.open(png).size and min(image.size) > 150
    for row in final["break_even"]:
        assert row["tpot"]["text"] in dom
    assert "n/a" in dom  # J/token without a GPU
    # the heat-map's cells are on the page in their colours: the SD advantage, log2, clipped at 2x, on RdYlGn
    cell = final["cells"][0]
    shade = np.clip(-np.log2(cell["ratios"]["tpot"]), -1, 1) / 2 + 0.5
    rgb = np.array(colormaps["RdYlGn"](shade)[:3]) * 255
    assert (np.abs(pixels - rgb).max(axis=2) < 12).sum() > 1000  # a colour of the colour bar alone: < 100


def test_resume_with_another_grid_is_refused(tiny_map):
    proc = payoff_map(*GRID_ARGS[:4], "--k", "2,4", "--out", tiny_map["out"], "--resume", "--dry-run", timeout=120)
    assert proc.returncode == 2 and "holds a map of another grid" in proc.stderr, proc.stderr


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("args, words", [
    (["--rates", "2,x", "--duration", "2", "--k", "2"], ["AUTO_RATE='x' (in --rates)"]),
    (["--rates", "0,2", "--duration", "2", "--k", "2"], ["--rates '0,2'", "> 0"]),
    (["--rates", "2", "--duration", "2", "--k", "2,2"], ["--k '2,2'", "listed twice"]),
    (["--rates", "2", "--k", "2"], ["AUTO_DURATION"]),
    (["--k", "2"], ["--rates or --concurrency"]),
    (["--concurrency", "1", "--k", "2", "--set", "NOPE=1"], ["--set 'NOPE=1'", "SpecLab variable"]),
    (["--concurrency", "1", "--k", "2", "--set", "GAMMA_VALUE=3"], ["GAMMA_VALUE is set by the payoff map"]),
    (["--concurrency", "1", "--k", "2", "--set", "NUM_PROMPTS=abc"], ["NUM_PROMPTS='abc'"]),
    (["--engine", "vllm", "--concurrency", "1", "--k", "2", "--batch-sizes", "2"], ["--batch-sizes", "hf"]),
    (["--concurrency", "1", "--k", "2", "--duration", "3"], ["--duration", "only with --rates"]),
])
def test_bad_flags_are_one_line_exit_2(args, words):
    proc = payoff_map(*args, "--dry-run", timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("error: ") and all(w in lines[0] for w in words), lines[0]


def test_bad_folders_are_one_line_exit_2(tmp_path):
    (tmp_path / "file").write_text("x")
    cases = [(["--report-only", "--out", tmp_path], "no payoff_grid.json"),
             (["--concurrency", "1", "--k", "2", "--out", tmp_path / "file" / "map"], "is a file, not a folder")]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "payoff_grid.json").write_text("{not json")
    cases.append((["--report-only", "--out", tmp_path / "bad"], "payoff_grid.json: not JSON"))
    for args, words in cases:
        proc = payoff_map(*args, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and words in lines[0], proc.stderr


@pytest.mark.parametrize("grid, words", [
    ({"engine": "hf", "load": "xyz", "loads": [1], "ks": [1]}, "load: unknown load axis 'xyz'; accepted: rate, "
                                                              "concurrency"),
    ({"engine": "HF", "load": "rate", "loads": [1], "ks": [1]}, "engine: unknown engine 'HF'; accepted: hf, vllm"),
    ({"engine": "hf", "load": "rate", "loads": "ab", "ks": [1]}, "loads: found text 'ab'; accepted: a list of "
                                                                "distinct finite numbers > 0"),
    ({"engine": "hf", "load": "rate", "loads": [1, 1.0], "ks": [1]}, "loads: 1.0 is listed twice"),
    ({"engine": "hf", "load": "rate", "loads": [1e999], "ks": [1]}, "loads[0]: found inf; accepted: a finite number"),
    ({"engine": "hf", "load": "rate", "loads": [2], "ks": [1.5]}, "ks[0]: found 1.5; accepted: a whole number >= 1"),
    ({"engine": "hf", "load": "rate", "loads": [2], "ks": [1], "fixed": []}, "fixed: found a list []; accepted: a "
                                                                            "mapping of VARIABLE: value"),
    ({"engine": "hf", "load": "rate", "loads": [2], "ks": [1], "fixed": {"SEED": [1]}}, "fixed.SEED: found a list"),
    ({"schema": "speclab.other/1", "engine": "hf"}, "schema: found text 'speclab.other/1'"),
    ([1], "found a list [1]; accepted: a mapping with keys engine, load"),
])
def test_a_damaged_grid_file_is_one_line_exit_2(tmp_path, grid, words):
    (tmp_path / "payoff_grid.json").write_text(json.dumps(grid))
    for args in (["--report-only"], ["--resume", "--dry-run"]):
        proc = payoff_map(*args, "--out", tmp_path, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert lines[0].startswith(f"error: {tmp_path / 'payoff_grid.json'}: {words}"), lines[0]


def test_a_written_grid_reads_back_the_same():
    grid = Grid(engine="hf", load="rate", loads=[0.5, 3.0000001], ks=[2], batch_sizes=[4], fixed={"SEED": 42,
                                                                                                 "AUTO_DURATION": 2.0})
    assert Grid.from_json(json.loads(json.dumps(grid.to_json())), "g").to_json() == grid.to_json()


def test_loads_that_print_alike_get_folders_of_their_own():
    grid = Grid(engine="hf", load="rate", loads=[3.0000001, 3.0000002, 2.0, 0.5], ks=[1])
    assert [c.id for c in cells_of(grid)] == [
        "ar__load-3p0000001", "sd__load-3p0000001__k-1", "ar__load-3p0000002", "sd__load-3p0000002__k-1",
        "ar__load-2", "sd__load-2__k-1", "ar__load-0p5", "sd__load-0p5__k-1"]
    long = [1.2345678901234567e-05, 1.2345678901234566e-05]  # 22 characters each, alike in their first 11
    slugs = [c.id.removeprefix("ar__load-") for c in cells_of(Grid(engine="hf", load="rate", loads=long, ks=[1]))
             if c.id.startswith("ar")]
    assert len(set(slugs)) == 2 and all(len(s) == 20 and s.startswith("1p234567890-") for s in slugs), slugs


def test_two_cells_in_one_folder_are_refused(monkeypatch):
    import lib.payoff
    monkeypatch.setattr(lib.payoff, "slug", lambda value: f"{value:g}")  # a lossy name, as the map once had
    with pytest.raises(UsageError, match=r"the grid's cells .*3\.0000001.* and .*3\.0000002.* would share the run "
                                         r"folder ar__load-3$"):
        cells_of(Grid(engine="hf", load="rate", loads=[3.0000001, 3.0000002], ks=[1]))


def test_dry_run_lists_one_folder_per_load_even_when_they_print_alike():
    proc = payoff_map("--rates", "3.0000001,3.0000002", "--k", "1", "--duration", "1", "--dry-run", timeout=120)
    assert proc.returncode == 0, proc.stderr
    ids = [line.split(":")[0] for line in (proc.stdout + proc.stderr).splitlines() if line.startswith(("ar__", "sd__"))]
    assert ids == ["ar__load-3p0000001", "sd__load-3p0000001__k-1", "ar__load-3p0000002", "sd__load-3p0000002__k-1"]


@pytest.mark.parametrize("value, engine", [("HF", "hf"), ("Transformers", "hf"), (" vllm ", "vllm"), ("", "hf")])
def test_inference_engine_is_read_as_the_benchmark_reads_it(value, engine):
    proc = subprocess.run([sys.executable, "payoff_map.py", "--concurrency", "1", "--k", "2", "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "INFERENCE_ENGINE": value})
    assert proc.returncode == 0, proc.stderr
    assert f"COMPARE_MODES={engine}:target" in proc.stderr + proc.stdout


def test_an_unknown_inference_engine_is_the_benchmarks_line():
    proc = subprocess.run([sys.executable, "payoff_map.py", "--concurrency", "1", "--k", "2", "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "INFERENCE_ENGINE": "bogus"})
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: INFERENCE_ENGINE='bogus' (from the environment): expected one of hf, transformers, vllm, sglang, "
        "llamacpp, openai"], proc.stderr
