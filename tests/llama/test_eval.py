"""Perplexity: sliding-window NLL equals a direct computation; quantized ppl close to float."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from fastzoo.llama.config import LlamaError
from fastzoo.llama.eval import continuation_logprob, perplexity, windows
from fastzoo.quant import quantize_
from llama_testutils import make_tiny_model

TOKENS = torch.randint(0, 96, (101,), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(std=0.1)


def _direct_nll_sum(model, ids):
    with torch.no_grad():
        logits = model(ids[None])[0]
    return float(F.cross_entropy(logits[:-1].double(), ids[1:], reduction="sum"))


def test_single_window_equals_full_forward(model):
    res = perplexity(model, TOKENS, max_seq_length=128, progress=False)
    assert res.tokens == 100 and res.windows == 1
    assert math.isclose(res.nll_sum, _direct_nll_sum(model, TOKENS), rel_tol=1e-5)
    assert math.isclose(res.perplexity, math.exp(res.nll_sum / 100))


@pytest.mark.parametrize("L,stride", [(40, 39), (48, 16)])
def test_sliding_windows_equal_direct_per_window_forwards(model, L, stride):
    res = perplexity(model, TOKENS, max_seq_length=L, stride=stride, progress=False)
    wins = windows(101, L, stride)
    assert res.windows == len(wins) > 2 and res.tokens == 100
    direct = 0.0
    for b, e, f in wins:  # each window: a plain full forward, cross entropy of its scored tokens
        ids = TOKENS[b:e]
        with torch.no_grad():
            logits = model(ids[None])[0]
        direct += float(F.cross_entropy(logits[f - b - 1:e - b - 1].double(), ids[f - b:], reduction="sum"))
    assert math.isclose(res.nll_sum, direct, rel_tol=1e-5)


def test_windows_score_every_token_once():
    for n, L, s in [(101, 40, 39), (101, 40, 13), (5, 40, 20), (64, 16, 1), (2, 2, 1)]:
        scored = [t for _, e, f in windows(n, L, s) for t in range(f, e)]
        assert scored == list(range(1, n)), (n, L, s)
        for i, (b, e, f) in enumerate(windows(n, L, s)):
            assert e - b <= L and b < f and (i == 0 or f - b >= L - s)
    for bad in (8, 9, 0):
        with pytest.raises(LlamaError, match="stride"):
            windows(10, 8, bad)


def test_sliding_window_close_to_full_context(model):
    full = perplexity(model, TOKENS, 128, progress=False).nll
    slid = perplexity(model, TOKENS, 48, 16, progress=False).nll
    assert abs(full - slid) < 0.05 * full  # ≥ 32 tokens of context for every scored token past the first window


# quantized vs float perplexity on random weights (consistency check): relative NLL change
PPL_BOUNDS = {"int8": 0.005, "int4-g32": 0.02}  # measured: 0.08 %, 0.13 %


@pytest.mark.parametrize("mode", list(PPL_BOUNDS))
def test_quantized_perplexity_close_to_float(model, mode):
    ref = perplexity(model, TOKENS, 64, 32, progress=False)
    q = perplexity(quantize_(copy.deepcopy(model), mode), TOKENS, 64, 32, progress=False)
    assert q.tokens == ref.tokens
    assert abs(q.nll - ref.nll) / ref.nll < PPL_BOUNDS[mode], (mode, ref.perplexity, q.perplexity)


def test_continuation_logprob(model):
    ctx, cont = TOKENS[:10].tolist(), TOKENS[10:14].tolist()
    ll, greedy = continuation_logprob(model, ctx, cont)
    with torch.no_grad():
        logp = model(TOKENS[None, :13])[0].double().log_softmax(-1)
    assert math.isclose(ll, float(sum(logp[9 + i, t] for i, t in enumerate(cont))), rel_tol=1e-5)
    best = []
    with torch.no_grad():
        for _ in range(4):  # the greedy continuation
            best.append(int(model(torch.tensor([ctx + best]))[0, -1].argmax()))
    assert continuation_logprob(model, ctx, best)[1]
    assert greedy == (cont == best)


def test_eval_cli(tmp_path, capsys):
    from fastzoo.llama.checkpoint import save_checkpoint
    from fastzoo.llama.eval import main
    from fastzoo.llama.tokenizer import load_tokenizer
    from llama_testutils import write_tiktoken_file
    m = make_tiny_model(std=0.1, vocab_size=576)
    ckpt = save_checkpoint(m, m.config, tmp_path / "ck", tokenizer_path=write_tiktoken_file(tmp_path / "t.model"))
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 6)
    assert main(["--checkpoint", str(ckpt), "--text", str(text), "--max-seq-length", "32", "--stride", "16",
                 "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "perplexity" in captured.err and "window" in captured.err  # the progress bar over the windows
    ids = load_tokenizer(ckpt / "tokenizer.model").encode(text.read_text(), bos=True)
    want = perplexity(m, ids, 32, 16, progress=False)
    assert f"perplexity: {want.perplexity:.4f}" in out and f"over {len(ids) - 1} tokens" in out
    assert main(["--checkpoint", str(ckpt), "--text", str(tmp_path / "nope.txt")]) == 1
    assert "text file not found" in capsys.readouterr().err
    assert main(["--checkpoint", str(ckpt), "--text", str(text), "--max-seq-length", "32", "--stride", "64",
                 "--device", "cpu"]) == 1
    assert "stride must be" in capsys.readouterr().err


class _Tok:
    stop_ids, pad_id = [], 0

    def encode(self, text, bos=False):
        return ([1] if bos else []) + [ord(c) % 96 for c in text]

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


class _Req:
    def __init__(self, *args):
        self.args = args


def _check_adapter(FastzooLM, model, make_request):
    tok = _Tok()
    lm = FastzooLM(model, tok, max_seq_length=64, max_gen_toks=5)
    (ll, greedy), = lm.loglikelihood([make_request("loglikelihood", ("abc", "de"))])
    assert math.isclose(ll, continuation_logprob(model, tok.encode("abc", bos=True), tok.encode("de"))[0],
                        rel_tol=1e-6)
    text = "hello there, general"
    roll = lm.loglikelihood_rolling([make_request("loglikelihood_rolling", (text,))])[0]
    assert math.isclose(roll, -perplexity(model, tok.encode(text, bos=True), 64, 63, progress=False).nll_sum,
                        rel_tol=1e-6)
    out = lm.generate_until([make_request("generate_until", ("abc", {"until": ["zzz"], "max_gen_toks": 4}))])[0]
    from fastzoo.llama.generate import generate
    want = tok.decode(generate(model, [tok.encode("abc", bos=True)], 4, temperature=0).tokens[0])
    assert out == want
    stop = want[2:]
    out = lm.generate_until([make_request("generate_until", ("abc", {"until": [stop], "max_gen_toks": 4}))])[0]
    assert out == want[:want.find(stop)]
    # lm_eval runs request types one after another: log-likelihoods after a generation task
    assert lm.loglikelihood([make_request("loglikelihood", ("abc", "de"))])[0] == (ll, greedy)
    assert lm.loglikelihood_rolling([make_request("loglikelihood_rolling", (text,))])[0] == roll


def test_lm_eval_adapter_with_base_class_stand_in(model, monkeypatch):
    """The adapter's logic, with a minimal stand-in for lm_eval's LM base class (runs without lm_eval)."""
    import importlib
    import sys
    import types
    if "lm_eval" in sys.modules or importlib.util.find_spec("lm_eval") is not None:
        pytest.skip("lm_eval is installed: test_lm_eval_adapter covers it")
    names = ("lm_eval", "lm_eval.api", "lm_eval.api.model", "lm_eval.api.registry", "lm_eval.utils")
    pkg, api, mod, registry, utils = (types.ModuleType(n) for n in names)

    class LM:
        def __init__(self):
            self._rank, self._world_size = 0, 1

    mod.LM = LM
    registered = {}
    registry.register_model = lambda *names: lambda cls: registered.update(dict.fromkeys(names, cls)) or cls
    utils.simple_parse_args_string = lambda s: dict(kv.split("=", 1) for kv in s.split(",") if kv)
    for name, m in zip(names, (pkg, api, mod, registry, utils)):
        monkeypatch.setitem(sys.modules, name, m)
    monkeypatch.delitem(sys.modules, "fastzoo.llama.lm_eval_adapter", raising=False)
    adapter = importlib.import_module("fastzoo.llama.lm_eval_adapter")
    try:
        assert registered == {"fastzoo": adapter.FastzooLM}
        _check_adapter(adapter.FastzooLM, model, lambda kind, args: _Req(*args))
    finally:
        sys.modules.pop("fastzoo.llama.lm_eval_adapter", None)


def test_lm_eval_adapter(model):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from fastzoo.llama.lm_eval_adapter import FastzooLM
    _check_adapter(FastzooLM, model,
                   lambda kind, args: Instance(request_type=kind, doc={}, arguments=args, idx=0))


def test_lm_eval_builds_the_registered_model_from_model_args(tmp_path):
    """``lm_eval.simple_evaluate(model="fastzoo", model_args="checkpoint=DIR,...")``: the
    registered name builds the adapter from a checkpoint; lm_eval's ``device`` applies."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.registry import get_model
    from fastzoo.llama.checkpoint import save_checkpoint
    from fastzoo.llama.lm_eval_adapter import FastzooLM
    from llama_testutils import write_tiktoken_file
    m = make_tiny_model(std=0.1, vocab_size=576)
    ckpt = save_checkpoint(m, m.config, tmp_path / "ck", tokenizer_path=write_tiktoken_file(tmp_path / "t.model"))
    lm = get_model("fastzoo").create_from_arg_string(f"checkpoint={ckpt},quantize=int8,max_gen_toks=3",
                                                     {"device": "cpu", "batch_size": 1})
    assert isinstance(lm, FastzooLM) and lm.max_gen_toks == 3
    assert next(lm.model.parameters()).device.type == "cpu"
    assert not any(isinstance(x, torch.nn.Linear) for x in lm.model.modules())  # quantized
    with pytest.raises(ValueError, match="checkpoint=DIR"):
        FastzooLM.create_from_arg_string("quantize=int8")
