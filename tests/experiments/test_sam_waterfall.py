"""experiments.sam_waterfall: techniques in fresh processes, skipped ones recorded, CSV/JSON/PNG/SVG."""
import csv
import json

import pytest

pytest.importorskip("pycocotools")
pytest.importorskip("matplotlib")

from experiments import sam_waterfall  # noqa: E402


def test_waterfall_runs_and_records_skips(tmp_path):
    rc = sam_waterfall.main(["--synthetic", "2", "--model-type", "tiny", "--techniques", "fp32,bf16",
                             "--extra", "--image-size 64 --workers 0 --warmup 0 --limit 1", "--device", "cpu",
                             "--out-dir", str(tmp_path), "--name", "wf"])
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "wf.csv")))
    assert [r["technique"] for r in rows] == ["fp32", "bf16"]
    assert rows[0]["status"] == "ok" and float(rows[0]["img_per_s"]) > 0 and 0 <= float(rows[0]["miou_oracle"]) <= 1
    assert rows[1]["status"] == "skipped" and "--dtype bf16" in rows[1]["reason"]
    assert json.loads((tmp_path / "wf.json").read_text())["figures"]["rows"][1]["status"] == "skipped"
    assert (tmp_path / "wf.png").read_bytes()[:4] == b"\x89PNG"
    assert b"<svg" in (tmp_path / "wf.svg").read_bytes()[:2000]


def test_techniques_build_on_the_last_that_ran(tmp_path, monkeypatch):
    seen = {}

    def fake(name, flags, common, out_dir, prefix, timeout):
        seen[name] = dict(flags)
        if name in ("compile", "sdpa", "sparse"):
            return {"technique": name, "status": "skipped", "reason": "not here"}
        return {"technique": name, "status": "ok", "img_per_s": 1.0 + len(seen), "peak_memory_gib": 2.0,
                "miou_oracle": 0.5}

    monkeypatch.setattr(sam_waterfall, "run_technique", fake)
    assert sam_waterfall.main(["--synthetic", "1", "--model-type", "tiny", "--batch-size", "4",
                               "--out-dir", str(tmp_path), "--name", "wf"]) == 0
    assert seen["bf16"]["--dtype"] == "bf16" and seen["bf16"]["--prompt-batch"] == "1"
    assert seen["fused"]["--kernel"] == "fused" and seen["fused"]["--compile"] == "off"  # compile was skipped
    pb = seen["prompt_batching"]
    assert pb["--batch-size"] == "4" and pb["--prompt-batch"] == "0" and pb["--kernel"] == "fused"
    assert seen["int8"]["--quantize"] == "int8" and seen["int8+sparse"]["--quantize"] == "int8+sparse"
    assert "--quantize" not in pb
    assert seen["int8+sparse"]["--batch-size"] == "4"  # quantizations sit on prompt batching, not on each other
    rows = list(csv.DictReader(open(tmp_path / "wf.csv")))
    assert [r["status"] for r in rows].count("skipped") == 3 and len(rows) == len(sam_waterfall.TECHNIQUES)
    assert (tmp_path / "wf.png").stat().st_size > 0 and (tmp_path / "wf.svg").stat().st_size > 0


def test_resume_keeps_done_techniques(tmp_path, monkeypatch):
    calls = []

    def fake(name, flags, common, out_dir, prefix, timeout):
        calls.append((name, dict(flags)))
        if name == "bf16" and len(calls) == 2:
            return {"technique": name, "status": "failed", "reason": "cut short"}
        return {"technique": name, "status": "ok", "img_per_s": 2.0, "peak_memory_gib": 1.0, "miou_oracle": 0.5}

    monkeypatch.setattr(sam_waterfall, "run_technique", fake)
    args = ["--synthetic", "1", "--model-type", "tiny", "--techniques", "fp32,bf16,compile", "--out-dir", str(tmp_path),
            "--name", "wf"]
    assert sam_waterfall.main(args) == 1  # a failed technique: non-zero exit, recorded
    assert [c[0] for c in calls] == ["fp32", "bf16", "compile"]
    calls.clear()
    assert sam_waterfall.main([*args, "--resume"]) == 0
    assert [c[0] for c in calls] == ["bf16", "compile"]  # fp32 kept; bf16 failed, compile had its old base
    assert calls[1][1]["--dtype"] == "bf16" and calls[1][1]["--compile"] == "on"
    rows = list(csv.DictReader(open(tmp_path / "wf.csv")))
    assert [r["status"] for r in rows] == ["ok", "ok", "ok"]
    calls.clear()
    assert sam_waterfall.main([*args, "--resume"]) == 0 and calls == []  # all done with the same flags
