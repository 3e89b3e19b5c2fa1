"""quantize → save → load → generate round trip; the config records the quantization."""
import copy
import json

import pytest
import torch

from fastzoo.llama.checkpoint import QUANT_FIELD, load_model, save_checkpoint
from fastzoo.llama.generate import generate
from fastzoo.llama.generate import main as generate_main
from fastzoo.llama.quantize import main as quantize_main
from fastzoo.quant import Int4WeightOnlyLinear, Int8WeightOnlyLinear, quantize_
from llama_testutils import make_tiny_model, write_tiktoken_file


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory):
    base = tmp_path_factory.mktemp("qckpt")
    model = make_tiny_model(std=0.1, vocab_size=576)  # the tiktoken test tokenizer's vocabulary
    tok = write_tiktoken_file(base / "tok.model")
    return model, save_checkpoint(model, model.config, base / "fp32", tokenizer_path=tok)


PROMPTS = [[1, 5, 9, 200], [7, 300]]


@pytest.mark.parametrize("argv,qcfg,cls", [
    (["--mode", "int8"], "int8", Int8WeightOnlyLinear),
    (["--mode", "int4", "--group-size", "32"], "int4-g32", Int4WeightOnlyLinear),
])
def test_quantize_save_load_generate(float_ckpt, tmp_path, capsys, argv, qcfg, cls):
    model, ckpt = float_ckpt
    out = tmp_path / "q"
    assert quantize_main(["--checkpoint", str(ckpt), "--out", str(out), "--device", "cpu", *argv]) == 0
    err = capsys.readouterr().err  # a progress bar over the model's layers
    n = len(model.layers) + 1  # each decoder layer, then the output head
    assert f"quantizing ({qcfg})" in err and f"{n}/{n}" in err and "layer" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.pth", "tokenizer.model"]
    rec = json.loads((out / "config.json").read_text())[QUANT_FIELD]
    assert rec["mode"] == argv[1] and rec["method"] == "rtn"
    loaded = load_model(out)
    assert isinstance(loaded.layers[1].feed_forward.w2, cls) and isinstance(loaded.output, cls)
    mem = quantize_(copy.deepcopy(model), qcfg)
    for k, v in mem.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert generate(loaded, PROMPTS, 10).tokens == generate(mem, PROMPTS, 10).tokens
    # generate --checkpoint needs no extra flag
    rc = generate_main(["--checkpoint", str(out), "--prompt", "hello", "--max-new-tokens", "4",
                        "--temperature", "0", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err


def test_gptq_checkpoint_round_trip(float_ckpt, tmp_path, capsys):
    model, ckpt = float_ckpt
    text = tmp_path / "calib.txt"
    text.write_text("hello world, the quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "gptq"
    assert quantize_main(["--checkpoint", str(ckpt), "--out", str(out), "--mode", "int4", "--group-size", "32",
                          "--gptq", "--calibration", str(text), "--calibration-seq-len", "32",
                          "--calibration-samples", "4", "--blocksize", "64", "--device", "cpu"]) == 0
    n = len(model.layers)
    assert "GPTQ (gptq-g32)" in (err := capsys.readouterr().err) and f"{n}/{n}" in err, err  # per-layer bar
    rec = json.loads((out / "config.json").read_text())[QUANT_FIELD]
    assert rec["method"] == "gptq" and rec["group_size"] == 32 and rec["calibration_tokens"] == 128
    loaded = load_model(out)
    assert isinstance(loaded.layers[0].attention.wqkv, Int4WeightOnlyLinear)
    # the checkpoint holds what in-memory GPTQ on the same calibration tokens produces
    from fastzoo.llama.quantize import calibration_tokens, gptq_quantize_llama_
    from fastzoo.llama.tokenizer import load_tokenizer
    from fastzoo.quant import GPTQ
    ids = calibration_tokens(text, load_tokenizer(ckpt / "tokenizer.model"), 4, 32)
    mem = gptq_quantize_llama_(copy.deepcopy(model), ids, GPTQ(32, 64), device="cpu", progress=False)
    for k, v in mem.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert generate(loaded, PROMPTS, 6).tokens == generate(mem, PROMPTS, 6).tokens


def test_gptq_from_token_ids(float_ckpt, tmp_path):
    """--calibration-ids: a torch.save'd tensor of token ids, no tokenizer involved; the
    checkpoint equals in-memory GPTQ on the same ids."""
    model, ckpt = float_ckpt
    ids = torch.randint(0, model.config.vocab_size, (3, 32), generator=torch.Generator().manual_seed(3))
    torch.save(ids, tmp_path / "ids.pt")
    out = tmp_path / "gptq_ids"
    assert quantize_main(["--checkpoint", str(ckpt), "--out", str(out), "--mode", "int4", "--group-size", "32",
                          "--gptq", "--calibration-ids", str(tmp_path / "ids.pt"), "--blocksize", "64",
                          "--device", "cpu"]) == 0
    rec = json.loads((out / "config.json").read_text())[QUANT_FIELD]
    assert rec["method"] == "gptq" and rec["calibration_tokens"] == 96 and "calibration_file" not in rec
    from fastzoo.llama.quantize import gptq_quantize_llama_
    from fastzoo.quant import GPTQ
    mem = gptq_quantize_llama_(copy.deepcopy(model), ids, GPTQ(32, 64), device="cpu", progress=False)
    loaded = load_model(out)
    for k, v in mem.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_calibration_file_errors(float_ckpt, tmp_path, capsys):
    """A calibration text that is not UTF-8, and token-id files that are not an integer
    tensor, are errors that say what was expected; both options at once are refused."""
    _, ckpt = float_ckpt
    (tmp_path / "bin.txt").write_bytes(bytes(range(128, 256)) * 4)
    torch.save(torch.rand(4, 8), tmp_path / "float.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a tensor")
    base = ["--checkpoint", str(ckpt), "--mode", "int4", "--group-size", "32", "--gptq", "--device", "cpu"]
    for argv, msg in ((["--calibration", str(tmp_path / "bin.txt")], "is not UTF-8 text"),
                      (["--calibration-ids", str(tmp_path / "float.pt")], "expected an integer tensor"),
                      (["--calibration-ids", str(tmp_path / "junk.pt")], "is not a torch.save'd tensor"),
                      (["--calibration-ids", str(tmp_path / "none.pt")], "token ids not found")):
        out = tmp_path / "bad"
        assert quantize_main([*base, "--out", str(out), *argv]) == 1
        assert msg in capsys.readouterr().err
        assert not out.exists()
    with pytest.raises(SystemExit):
        quantize_main([*base, "--out", str(tmp_path / "o"), "--calibration", "a.txt", "--calibration-ids", "b.pt"])


@pytest.mark.parametrize("argv,msg", [
    (["--mode", "int3"], "unknown quantization mode"),
    (["--mode", "int4", "--group-size", "48"], "group size must be one of"),
    (["--mode", "int8", "--group-size", "32"], "int4 only"),
    (["--mode", "int8", "--gptq", "--calibration", "x.txt"], "--mode int4"),
    (["--mode", "int4", "--gptq"], "needs --calibration"),
    (["--mode", "int4", "--gptq", "--calibration", "/nonexistent.txt"], "calibration file not found"),
])
def test_quantize_cli_errors(float_ckpt, tmp_path, capsys, argv, msg):
    _, ckpt = float_ckpt
    out = tmp_path / "bad"
    assert quantize_main(["--checkpoint", str(ckpt), "--out", str(out), "--device", "cpu", *argv]) == 1
    assert msg in capsys.readouterr().err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".bad")]


def test_quantize_refuses_nonempty_out_and_group_not_dividing(float_ckpt, tmp_path, capsys):
    _, ckpt = float_ckpt
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    assert quantize_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), "--mode", "int8"]) == 1
    assert "not empty" in capsys.readouterr().err
    assert quantize_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "o2"), "--mode", "int4",
                          "--group-size", "256", "--device", "cpu"]) == 1
    assert "does not divide" in capsys.readouterr().err


def test_bad_recorded_quantization_is_an_error(float_ckpt, tmp_path):
    from fastzoo.llama.config import LlamaError
    _, ckpt = float_ckpt
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg[QUANT_FIELD] = {"mode": "int4", "group_size": 48}
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LlamaError, match=QUANT_FIELD):
        load_model(bad)
    cfg[QUANT_FIELD] = {"mode": "int8"}  # float weights but recorded as int8
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LlamaError, match="records the quantization int8"):
        load_model(bad)
