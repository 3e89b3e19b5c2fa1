"""experiments.report: CSVs, charts, summary and the README block from JSON records alone."""
import csv
import json

import pytest

from experiments import harness, report

ENV = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "cuda": "13.0", "triton": "3.6.0",
       "python": "3.12.3", "commit": "abcdef0123", "date": "2026-11-22T04:00:00+00:00"}


def llama(mode, weight_bytes, tok_s):
    return {"name": f"llama_decode_llama-2-7b_{mode}_compile", "module": "experiments.llama_decode", **ENV,
            "figures": {"preset": "llama-2-7b", "dtype": "torch.bfloat16", "compile": True,
                        "quantize": None if mode == "bf16" else mode, "weight_bytes": weight_bytes,
                        "copy_bandwidth_gbs": 2900.0, "prefill_tokens_per_s": 30000.0,
                        "batches": {"8": {"decode_tokens_per_s_per_seq": tok_s / 2, "total_tokens_per_s": 4 * tok_s},
                                    "1": {"decode_tokens_per_s_per_seq": tok_s, "total_tokens_per_s": tok_s,
                                          "time_to_first_token_ms": 20.0, "compile_s": 100.0}}}}


FIXTURES = {
    "ceilings": {"name": "ceilings", **ENV, "command": "python -m experiments.ceilings",
                 "figures": {"copy_gbps": 3000.0, "bf16_tflops": 780.0, "fp16_tflops": 750.0, "int8_tops": 870.0}},
    "llama_bf16": llama("bf16", 13.5e9, 160.0),
    "llama_int8": llama("int8", 7.0e9, 250.0),
    "vit": {"name": "vit_throughput", **ENV,  # no "module": an older record, known by its name
            "figures": {"bf16_ceiling_tflops": 780.0, "rows": [  # vit_throughput's layout
                {"model": "vit_base_patch16_224", "mode": v, "batch": 256, "img_s": s,
                 "pct_bf16_ceiling": p, "x_vs_fz_bf16": s / 3300}
                for v, s, p in [("timm-fp32", 2000.0, 20.0), ("timm-bf16-compile", 3000.0, 30.0),
                                ("fz-bf16-compile", 3300.0, 33.0), ("fz-int8dq", 4200.0, 40.0)]]}},
    "sam": {"name": "sam_waterfall_vit_h", "module": "experiments.sam_waterfall", "model": "sam",
            "config": "sam_waterfall_vit_h", **ENV,
            "figures": {"rows": [{"technique": t, "img_s": s} for t, s in
                                 [("baseline fp32", 5.0), ("+ bf16", 12.0), ("+ compile", 20.0)]]}},
}


@pytest.fixture
def results(tmp_path):
    folder = tmp_path / "results" / "h100-80gb-hbm3"
    folder.mkdir(parents=True)
    for name, rec in FIXTURES.items():
        (folder / f"{name}.json").write_text(json.dumps(rec))
    (folder / "failures.json").write_text(json.dumps(
        {"sam_amg_vit_h": {"reason": "exited with status 1", "command": "python -m experiments.bench_amg"}}))
    return folder


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_rows_and_pct_of_ceiling():
    ceilings = report.ceilings_of([FIXTURES["ceilings"]])
    rows = report.rows_of(FIXTURES["llama_int8"], ceilings)
    assert [r["batch"] for r in rows] == [1, 8]  # numeric order
    assert rows[0]["ceiling_tokens_per_s"] == pytest.approx(3000e9 / 7.0e9)
    assert rows[0]["pct_of_ceiling"] == pytest.approx(100 * 250 / (3000 / 7.0))
    assert rows[0]["mode"] == "int8" and report.rows_of(FIXTURES["llama_bf16"], ceilings)[0]["mode"] == "bf16"
    # without a ceilings record the record's own copy bandwidth is the ceiling
    assert report.rows_of(FIXTURES["llama_int8"], {})[0]["ceiling_tokens_per_s"] == pytest.approx(2900 / 7.0)
    pct = report.pct_of_ceiling(FIXTURES["llama_int8"], ceilings)
    assert pct[0]["what"] == "llama-2-7b int8 batch 1 decode" and pct[0]["pct"] == pytest.approx(rows[0]["pct_of_ceiling"])
    assert {p["pct"] for p in report.pct_of_ceiling(FIXTURES["vit"], ceilings)} == {20.0, 30.0, 33.0, 40.0}
    assert report.record_kind(FIXTURES["vit"]) == "vit_throughput" and report.record_model(FIXTURES["vit"]) == "vit"
    assert report.record_kind({"name": "weight_only_linear_llama3"}) == "bench_weight_only_linear"


def test_csv_and_summary_from_records(results, tmp_path):
    out = tmp_path / "report"
    res = report.write_report(results, out, charts=False)
    assert res["records"] == 5
    assert sorted(p.name for p in res["csv"]) == ["device.csv", "llama.csv", "sam.csv", "vit.csv"]
    llama = read_csv(out / "llama.csv")
    assert len(llama) == 4 and {r["mode"] for r in llama} == {"bf16", "int8"}
    int8_b1 = next(r for r in llama if r["mode"] == "int8" and r["batch"] == "1")
    assert float(int8_b1["pct_of_ceiling"]) == pytest.approx(100 * 250 / (3000 / 7.0))
    assert int8_b1["record"] == "llama_int8.json" and int8_b1["gpu"] == ENV["gpu"]
    assert [r["technique"] for r in read_csv(out / "sam.csv")] == ["baseline fp32", "+ bf16", "+ compile"]
    summary = (out / "summary.md").read_text()
    assert "NVIDIA H100 80GB HBM3; torch 2.11.0+cu130" in summary and "measured 2026-11-22" in summary
    assert "| 3,000 GB/s | 780 TFLOP/s | 750 TFLOP/s | 870 TOP/s |" in summary
    assert "| llama-2-7b | int8 | 1 | 250 | 250 | 429 | 58.3 |" in summary
    # ViT: timm (baseline) and fastzoo modes side by side, best fastzoo speedup over fastzoo bf16
    assert "| vit_base_patch16_224 | 256 | 2,000 | 3,000 | 3,300 | 4,200 | 1.27× |" in summary
    assert "| + compile | 20.0 |" in summary
    assert "sam_amg_vit_h" in summary and "exited with status 1" in summary


def test_charts_png_and_svg(results, tmp_path):
    pytest.importorskip("matplotlib")
    paths = report.write_charts(report.load_records(results), tmp_path)
    names = sorted(p.name for p in paths)
    assert names == ["llama_decode.png", "llama_decode.svg", "sam.png", "sam.svg",
                     "vit_throughput.png", "vit_throughput.svg"]
    for p in paths:
        data = p.read_bytes()
        assert (data[:8] == b"\x89PNG\r\n\x1a\n") if p.suffix == ".png" else (b"<svg" in data[:2000])
    svg = (tmp_path / "llama_decode.svg").read_text()
    assert "ceiling" in svg  # the bandwidth-ceiling bars are labelled
    vit_svg = (tmp_path / "vit_throughput.svg").read_text()
    assert all(m in vit_svg for m in ("timm-fp32", "fz-bf16-compile", "fz-int8dq"))  # one bar per mode


def test_cli_report_and_readme_update(results, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Results\n\n{report.BEGIN}\nold\n{report.END}\n\n## Next\n")
    root = results.parent
    args = ["--readme", str(readme), "--results-root", str(root)]
    assert report.main(["--check-readme", *args]) == 1
    assert report.main(["--update-readme", *args]) == 0
    text = readme.read_text()
    assert text.startswith("# x\n\n## Results\n\n<!-- results:begin -->") and text.endswith("<!-- results:end -->\n\n## Next\n")
    assert "### NVIDIA H100 80GB HBM3 (`experiments/results/h100-80gb-hbm3/`)" in text and "old" not in text
    assert report.main(["--check-readme", *args]) == 0
    readme.write_text("no markers")
    assert report.main(["--check-readme", *args]) == 2
    assert report.main([str(results), "--out", str(tmp_path / "o"), "--no-charts"]) == 0
    assert (tmp_path / "o" / "summary.md").exists()
    assert report.main([str(tmp_path / "nope")]) == 2


def test_readme_results_block_matches_committed_records():
    """README.md's results block is what the generator makes of experiments/results/ (no stale tables)."""
    text = report.README.read_text()
    assert text.count(report.BEGIN) == 1 and text.count(report.END) == 1
    assert report.readme_current_block(text) == report.readme_block(), (
        "README.md's results block is stale: run python -m experiments.report --update-readme")


def test_redirect_results(tmp_path):
    with harness.redirect_results(tmp_path / "a") as folder:
        path = harness.save_result("r", {"x": 1})
        assert path == folder / "r.json"
        assert harness.save_result("r", {"x": 2}, out_dir=tmp_path / "b") == tmp_path / "b" / "r.json"
    assert harness.results_dir() == harness.RESULTS_DIR / harness.gpu_slug()
    assert json.loads(path.read_text())["figures"] == {"x": 1}


def test_records_of_another_layout_do_not_break_the_report(results, tmp_path, capsys):
    odd = {"name": "llama_decode_x", "module": "experiments.llama_decode", **ENV,
           "figures": {"batches": [1, 2], "note": "a layout the reader does not know"}}
    tp = {"name": "llama_tp", "module": "experiments.llama_tp", **ENV,
          "figures": {"rows": [{"ranks": 2, "tokens_per_s": 250.0}]}}
    (results / "odd.json").write_text(json.dumps(odd))
    (results / "tp.json").write_text(json.dumps(tp))
    res = report.write_report(results, tmp_path / "o", charts=False)
    assert res["records"] == 7
    summary = (tmp_path / "o" / "summary.md").read_text()
    assert "a layout the reader does not know" in summary and "| 2 | 250 |" in summary
    assert "| llama-2-7b | int8 | 1 | 250 |" in summary  # the other llama records keep their table
    assert "odd.json: not in the layout llama_rows reads" in capsys.readouterr().err


def test_readme_caps_long_row_tables_and_shows_the_summary(results):
    """A record tabulated row by row shows at most README_MAX_ROWS rows in the README block,
    with its summary text and a pointer to the rest; summary.md keeps them all."""
    n = report.README_MAX_ROWS + 7
    sweep = {"name": "int8_mm_sweep_x", "module": "experiments.bench_int8_mm", **ENV,
             "figures": {"summary": {"text": "the best tile wins at every shape"},
                         "rows": [{"config": f"cfg{i}", "tops": 1000.0 + i} for i in range(n)]}}
    (results / "sweep.json").write_text(json.dumps(sweep))
    block = report.readme_block(results.parent)
    assert "| cfg0 | 1,000 |" in block and f"| cfg{report.README_MAX_ROWS - 1} |" in block
    assert f"| cfg{report.README_MAX_ROWS} |" not in block
    assert "the best tile wins at every shape" in block and "… and 7 more rows in `sweep.json`." in block
    full = report.markdown(report.load_records(results))
    assert f"| cfg{n - 1} |" in full and "more rows" not in full
