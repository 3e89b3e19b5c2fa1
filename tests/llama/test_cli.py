import json
import shutil
import subprocess
import sys

import pytest
import torch

from fastzoo.llama.checkpoint import load_model
from fastzoo.llama.generate import generate, main
from fastzoo.llama.tokenizer import load_tokenizer


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_batch_of_prompts_greedy(capsys, converted):
    _, ckpt = converted["gqa"]
    prompts = ["hello world", "the quick brown fox jumps"]
    rc, out, err = _run(capsys, "--checkpoint", ckpt, "--prompt", prompts[0], "--prompt", prompts[1],
                        "--max-new-tokens", 8, "--temperature", 0, "--device", "cpu")
    assert rc == 0, err
    tok = load_tokenizer(ckpt / "tokenizer.model")
    model = load_model(ckpt, dtype=torch.float32)
    ref = generate(model, [tok.encode(p, bos=True) for p in prompts], 8,
                   stop_ids=tok.stop_ids, pad_id=tok.pad_id)
    for i, p in enumerate(prompts):
        assert f"--- [{i}] {p}{tok.decode(ref.tokens[i])}" in out
    for what in ("time to first token", "tokens/s", "GB/s"):
        assert what in err


def test_cli_streams_single_prompt(capsys, converted):
    _, ckpt = converted["mha"]
    rc, out, err = _run(capsys, "--checkpoint", ckpt, "--prompt", "hello", "--max-new-tokens", 6,
                        "--temperature", 0.7, "--top-k", 20, "--top-p", 0.9, "--seed", 1, "--num-samples", 2)
    assert rc == 0, err
    lines = out.splitlines()
    assert len(lines) >= 2 and lines[0].startswith("hello")
    assert "[sample 1]" in err


def test_cli_interactive(monkeypatch, capsys, converted):
    _, ckpt = converted["gqa"]
    inputs = iter(["how are you"])

    def fake_input(prompt=""):
        try:
            return next(inputs)
        except StopIteration:
            raise EOFError from None
    monkeypatch.setattr("builtins.input", fake_input)
    rc, out, err = _run(capsys, "--checkpoint", ckpt, "--interactive", "--max-new-tokens", 5,
                        "--temperature", 0, "--max-seq-length", 128, "--system", "be nice")
    assert rc == 0, err
    assert "tokens/s" in err


def test_cli_missing_checkpoint(capsys, tmp_path):
    rc, _, err = _run(capsys, "--checkpoint", tmp_path / "nope", "--prompt", "x")
    assert rc != 0 and "checkpoint directory not found" in err


def test_cli_missing_tokenizer(capsys, tmp_path, converted):
    _, ckpt = converted["mha"]
    d = tmp_path / "ck"
    shutil.copytree(ckpt, d)
    (d / "tokenizer.model").unlink()
    rc, _, err = _run(capsys, "--checkpoint", d, "--prompt", "x")
    assert rc != 0 and "tokenizer file not found" in err


def test_cli_weights_do_not_match_config(capsys, tmp_path, converted):
    _, ckpt = converted["mha"]
    d = tmp_path / "ck"
    shutil.copytree(ckpt, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_key_value_heads"] = 2
    (d / "config.json").write_text(json.dumps(cfg))
    rc, _, err = _run(capsys, "--checkpoint", d, "--prompt", "x")
    assert rc != 0 and "layers.0.attention.wqkv.weight" in err and "(192, 64)" in err and "(128, 64)" in err


def test_cli_prompt_too_long(capsys, converted):
    _, ckpt = converted["mha"]
    rc, _, err = _run(capsys, "--checkpoint", ckpt, "--prompt", "hello world " * 200, "--max-new-tokens", 4)
    assert rc != 0 and "maximum sequence length" in err


@pytest.mark.parametrize("args, msg", [
    (["--temperature", "-1"], "--temperature"),
    (["--top-k", "0"], "--top-k"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--num-samples", "0"], "--num-samples"),
])
def test_cli_invalid_sampling_arguments(capsys, converted, args, msg):
    _, ckpt = converted["mha"]
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(ckpt), "--prompt", "x"] + args)
    assert e.value.code != 0 and msg in capsys.readouterr().err


def test_module_entry_point(converted):
    _, ckpt = converted["mha"]
    r = subprocess.run([sys.executable, "-m", "fastzoo.llama.generate", "--checkpoint", str(ckpt),
                        "--prompt", "hello", "--max-new-tokens", "3", "--temperature", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("hello") and "tokens/s" in r.stderr
