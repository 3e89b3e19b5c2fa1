"""Speculative decoding: greedy output equals the target's greedy output; the acceptance
rule samples from the target's distribution."""
import copy

import pytest
import torch

from fastzoo.llama.config import LlamaError
from fastzoo.llama.generate import Generator, SpeculativeGenerator, accept_draft
from fastzoo.quant import quantize_
from llama_testutils import make_tiny_model

PROMPT = [[3, 17, 42, 5, 61]]


@pytest.fixture(scope="module")
def target():
    return make_tiny_model(seed=0, std=0.15)


@pytest.mark.parametrize("draft_kind,k", [("random", 3), ("same", 4), ("int4", 2)])
def test_greedy_speculative_equals_greedy_target(target, draft_kind, k):
    draft = {"random": lambda: make_tiny_model(seed=5, std=0.15, n_layers=1, dim=32, intermediate_size=64),
             "same": lambda: target,
             "int4": lambda: quantize_(copy.deepcopy(target), "int4-g32")}[draft_kind]()
    ref = Generator(target).generate(PROMPT, 24, temperature=0)
    out = SpeculativeGenerator(target, draft, k).generate(PROMPT, 24, temperature=0)
    assert out.tokens == ref.tokens
    st = out.stats
    assert st["proposed"] == k * st["rounds"] and 0 <= st["acceptance_rate"] <= 1
    if draft_kind == "same":
        assert st["acceptance_rate"] == 1.0  # the draft is the target: every proposal matches
    if draft_kind == "int4":
        assert 0 < st["acceptance_rate"] < 1  # both paths: accepted drafts and corrections
    assert st["rounds"] <= 23


def test_greedy_speculative_stops_at_stop_token(target):
    ref = Generator(target).generate(PROMPT, 16, temperature=0)
    stop = ref.tokens[0][6]
    want = Generator(target).generate(PROMPT, 16, temperature=0, stop_ids=[stop])
    out = SpeculativeGenerator(target, target, 3).generate(PROMPT, 16, temperature=0, stop_ids=[stop])
    assert out.tokens == want.tokens and out.finished == want.finished == [True]


def test_speculative_sampling_runs_and_errors(target):
    draft = make_tiny_model(seed=5, std=0.15, n_layers=1)
    torch.manual_seed(0)
    out = SpeculativeGenerator(target, draft, 3).generate(PROMPT, 12, temperature=0.8, top_k=20)
    assert len(out.tokens[0]) == 12 and all(0 <= t < 96 for t in out.tokens[0])
    with pytest.raises(LlamaError, match="batch 1"):
        SpeculativeGenerator(target, draft, 3).generate(PROMPT * 2, 4)
    with pytest.raises(LlamaError, match="vocabulary"):
        SpeculativeGenerator(target, make_tiny_model(vocab_size=64), 3)
    with pytest.raises(LlamaError, match="speculate_k"):
        SpeculativeGenerator(target, draft, 0)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_speculative_compiled_fullgraph(target, temperature):
    """Draft step and verify each trace as one graph (fullgraph: no host sync / graph break inside);
    trace-only check with the eager backend, compiled once for all rounds."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    draft = make_tiny_model(seed=5, std=0.15, n_layers=1)
    ref = SpeculativeGenerator(target, draft, 2).generate(PROMPT, 10, temperature=0)
    spec = SpeculativeGenerator(target, draft, 2, compile=True, compile_backend="eager")
    out = spec.generate(PROMPT, 10, temperature=temperature)
    if temperature == 0:
        assert out.tokens == ref.tokens
    assert len(out.tokens[0]) == 10
    assert counters["stats"]["unique_graphs"] == 3, counters["stats"]  # target prefill, draft step, verify
    torch._dynamo.reset()


def _emitted_distribution(p, q, n_samples, gen_seed):
    """Empirical distribution of the first and second emitted tokens of accept_draft."""
    torch.manual_seed(gen_seed)
    k, V = q.shape
    draft = torch.multinomial(q, n_samples, replacement=True).t()  # [N, k]: d_i ~ q_i
    n, toks = accept_draft(p.expand(n_samples, k + 1, V), q.expand(n_samples, k, V), draft, greedy=False)
    first = torch.bincount(toks[:, 0], minlength=V).double() / n_samples
    has2 = n >= 1  # a second token is emitted in this round when the first draft was accepted
    second = torch.bincount(toks[has2, 1], minlength=V).double() / has2.sum()
    return n, first, second


@pytest.mark.parametrize("seed", [0, 1])
def test_acceptance_rule_samples_target_distribution(seed):
    g = torch.Generator().manual_seed(seed)
    V, k, N = 6, 2, 200_000
    p = torch.softmax(2 * torch.randn(k + 1, V, generator=g), -1)
    q = torch.softmax(2 * torch.randn(k, V, generator=g), -1)
    q[0, 2] = 0.0  # the draft never proposes a token the target likes: only reached by resampling
    q = q / q.sum(-1, keepdim=True)
    n, first, second = _emitted_distribution(p, q, N, seed)
    tol = 4 * (p * (1 - p) / N).sqrt() + 2e-3
    assert ((first - p[0]).abs() < tol[0]).all(), (first, p[0])
    # given d_1 was accepted, the second token is still distributed as p_1 (p_1 does not depend on d_1 here)
    n2 = int((n >= 1).sum())
    tol2 = 4 * (p[1] * (1 - p[1]) / n2).sqrt() + 2e-3
    assert ((second - p[1]).abs() < tol2).all(), (second, p[1])
    # acceptance probability of the first draft = Σ min(p, q)
    assert abs(float((n >= 1).double().mean()) - float(torch.minimum(p[0], q[0]).sum())) < 0.01


def test_acceptance_rule_all_accepted_when_draft_equals_target():
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(4, 5, generator=g), -1)
    N = 20_000
    torch.manual_seed(0)
    draft = torch.multinomial(p[:3], N, replacement=True).t()
    n, toks = accept_draft(p.expand(N, 4, 5), p[:3].expand(N, 3, 5), draft, greedy=False)
    assert (n == 3).all()  # q == p: always accepted, then a bonus token from p_3
    bonus = torch.bincount(toks[:, 3], minlength=5).double() / N
    assert ((bonus - p[3]).abs() < 4 * (p[3] * (1 - p[3]) / N).sqrt() + 2e-3).all()


def test_acceptance_rule_greedy():
    logits = torch.tensor([[0.1, 3.0, 0.2], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]])  # argmax 1, 0, 2
    n, toks = accept_draft(logits, None, torch.tensor([1, 0]), greedy=True)
    assert int(n) == 2 and toks.tolist() == [1, 0, 2]
    n, toks = accept_draft(logits, None, torch.tensor([1, 2]), greedy=True)
    assert int(n) == 1 and toks[:2].tolist() == [1, 0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from fastzoo.llama.checkpoint import save_checkpoint
    from llama_testutils import write_tiktoken_file
    base = tmp_path_factory.mktemp("spec")
    model = make_tiny_model(std=0.15, vocab_size=576)
    return save_checkpoint(model, model.config, base / "fp32", tokenizer_path=write_tiktoken_file(base / "t.model"))


def _cli(capsys, *argv):
    from fastzoo.llama.generate import main
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_speculative_with_quantized_draft(ckpt, capsys):
    common = ["--checkpoint", ckpt, "--prompt", "hello world", "--max-new-tokens", 12, "--temperature", 0,
              "--device", "cpu"]
    rc, ref, err = _cli(capsys, *common)
    assert rc == 0, err
    rc, out, err = _cli(capsys, *common, "--speculate-k", 3, "--draft-quantize", "int4-g32")
    assert rc == 0, err
    assert out == ref and "acceptance rate" in err
    rc, out, err = _cli(capsys, *common, "--speculate-k", 2, "--draft-checkpoint", ckpt)
    assert rc == 0 and out == ref and "acceptance rate 100.0%" in err


@pytest.mark.parametrize("extra,msg", [
    (["--speculate-k", "2"], "needs a draft"),
    (["--draft-quantize", "int8"], "need --speculate-k"),
    (["--speculate-k", "2", "--draft-quantize", "int8", "--prompt", "again"], "batch 1"),
    (["--speculate-k", "0", "--draft-quantize", "int8"], ">= 1"),
])
def test_cli_speculative_argument_errors(ckpt, capsys, extra, msg):
    with pytest.raises(SystemExit) as e:
        _cli(capsys, "--checkpoint", ckpt, "--prompt", "hi", *extra)
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_cli_speculative_runtime_errors(ckpt, capsys, tmp_path):
    rc, _, err = _cli(capsys, "--checkpoint", ckpt, "--prompt", "hi", "--speculate-k", 2,
                      "--draft-checkpoint", tmp_path / "missing", "--device", "cpu")
    assert rc == 1 and "draft checkpoint directory not found" in err
    rc, _, err = _cli(capsys, "--checkpoint", ckpt, "--prompt", "hi", "--speculate-k", 2,
                      "--draft-quantize", "int5", "--device", "cpu")
    assert rc == 1 and "unknown quantization" in err


def test_cli_draft_quantize_of_quantized_checkpoint_is_an_error(ckpt, capsys, tmp_path):
    from fastzoo.llama.quantize import quantize_checkpoint
    q = quantize_checkpoint(ckpt, tmp_path / "int8", "int8", progress=False)
    rc, _, err = _cli(capsys, "--checkpoint", ckpt, "--prompt", "hi", "--speculate-k", 2,
                      "--draft-checkpoint", q, "--draft-quantize", "int4-g32", "--device", "cpu")
    assert rc == 1 and "already quantized" in err
    rc, _, err = _cli(capsys, "--checkpoint", q, "--prompt", "hi", "--speculate-k", 2, "--max-new-tokens", 4,
                      "--draft-checkpoint", q, "--device", "cpu", "--temperature", 0)
    assert rc == 0 and "acceptance rate 100.0%" in err


def test_rounds_after_the_end_stay_in_the_cache(target, monkeypatch):
    """Rounds the host runs after the sequence finished (it learns of the end late: every few
    steps on CUDA, one round late under tensor parallelism) rewrite the finished round's cache
    slots: with a cache of exactly prompt + max_new_tokens + k + 1 slots and a stop check that
    never fires, every extra round stays inside it and the output is unchanged."""
    import importlib
    gen_mod = importlib.import_module("fastzoo.llama.generate")  # the module (the package exports a function)
    k, new = 3, 11  # the draft is the target: 1 + 4 + 4 + 4 = 13 tokens, 2 past max_new_tokens
    draft = target
    want = SpeculativeGenerator(target, draft, k).generate(PROMPT, new, temperature=0)
    assert want.stats["rounds"] == 3
    monkeypatch.setattr(gen_mod, "_stop_check", lambda model, device, every: lambda step, done: False)
    tight = len(PROMPT[0]) + new + k + 1
    out = SpeculativeGenerator(target, draft, k, max_seq_length=tight).generate(PROMPT, new, temperature=0)
    assert out.tokens == want.tokens and out.stats == want.stats
    assert want.stats["rounds"] < new - 1  # the loop really ran rounds past the end
