"""An ``lm_eval`` (EleutherAI lm-evaluation-harness) model backed by a fastzoo Llama.

Import this module only when ``lm_eval`` is installed::

    from fastzoo.llama.lm_eval_adapter import FastzooLM
    import lm_eval
    lm = FastzooLM.from_checkpoint("ckpt/llama-2-7b-int4", device="cuda")
    lm_eval.simple_evaluate(model=lm, tasks=["wikitext", "hellaswag"])
    # or by its registered name (importing this module registers "fastzoo"):
    lm_eval.simple_evaluate(model="fastzoo", model_args="checkpoint=ckpt/llama-2-7b,quantize=int4-g128",
                            tasks=["wikitext"])

The model may be quantized (a quantized checkpoint, or ``quantize=`` on a float one).
Log-likelihoods come from :func:`fastzoo.llama.eval.continuation_logprob` and
:func:`fastzoo.llama.eval.perplexity` (windows overlapping by one token), generation from
:class:`fastzoo.llama.generate.Generator` (greedy unless ``temperature`` is given).
"""
from __future__ import annotations

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import simple_parse_args_string
from tqdm import tqdm

from .checkpoint import load_model, resolve_run_args
from .eval import continuation_logprob, perplexity
from .generate import Generator
from .model import Transformer
from .tokenizer import Tokenizer, load_tokenizer


@register_model("fastzoo")
class FastzooLM(LM):
    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_seq_length: int | None = None,
                 max_gen_toks: int = 256, compile: bool = False):
        super().__init__()
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_seq_length = max_seq_length or min(2048, model.config.max_position_embeddings)
        self.max_gen_toks = max_gen_toks
        self.generator = Generator(model, compile=compile)

    @classmethod
    def from_checkpoint(cls, checkpoint, device=None, dtype=None, quantize: str | None = None, **kw):
        """``device``: default CUDA when available, else the CPU; ``dtype``: default bf16 on
        CUDA, fp32 on the CPU; ``quantize``: a ``fastzoo.quant`` config name for a float
        checkpoint; ``kw``: the constructor's options."""
        device, dtype, tok_path = resolve_run_args(checkpoint, device, dtype)
        model = load_model(checkpoint, device=device, dtype=dtype)
        if quantize:
            from fastzoo.quant import quantize_
            quantize_(model, quantize)
        return cls(model, load_tokenizer(tok_path), **kw)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """``lm_eval`` building the model by name: ``model_args`` as
        ``checkpoint=DIR[,device=cpu][,dtype=bf16][,quantize=int4-g128][,max_seq_length=N]``
        ``[,max_gen_toks=N][,compile=True]``; of lm_eval's own options only ``device`` applies."""
        args = simple_parse_args_string(arg_string)
        if "checkpoint" not in args:
            raise ValueError(f"fastzoo model_args need checkpoint=DIR, got {arg_string!r}")
        device = (additional_config or {}).get("device")
        if device is not None:
            args.setdefault("device", device)
        return cls.from_checkpoint(args.pop("checkpoint"), **args)

    def _encode(self, text: str, bos: bool) -> list[int]:
        return self.tokenizer.encode(text, bos=bos)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        out = []
        for req in tqdm(requests, desc="loglikelihood", disable=disable_tqdm):
            context, continuation = req.args
            whole = self._encode(context + continuation, bos=True)
            ctx = self._encode(context, bos=True)
            # score the tokens of the whole string past the context's (robust to merges at the boundary)
            n_ctx = min(len(ctx), len(whole) - 1)
            out.append(continuation_logprob(self.model, whole[:n_ctx], whole[n_ctx:], self.max_seq_length))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        out = []
        for req in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            (text,) = req.args
            ids = self._encode(text, bos=True)
            if len(ids) < 2:
                out.append(0.0)
                continue
            res = perplexity(self.model, ids, self.max_seq_length, self.max_seq_length - 1, progress=False)
            out.append(-res.nll_sum)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False):
        try:
            return self._generate_until(requests, disable_tqdm)
        finally:  # the log-likelihood methods run full forwards: no KV caches left behind
            self.model.clear_caches()

    def _generate_until(self, requests, disable_tqdm: bool):
        out = []
        for req in tqdm(requests, desc="generate_until", disable=disable_tqdm):
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(gen_kwargs.pop("temperature", 0.0)) if gen_kwargs.get("do_sample", True) else 0.0
            ids = self._encode(context, bos=True)[-max(1, self.max_seq_length - max_new):]
            stop = sorted(set(self.tokenizer.stop_ids) | set(self.model.config.eos_ids))
            res = self.generator.generate([ids], max_new, temperature=temperature, stop_ids=stop,
                                          pad_id=self.tokenizer.pad_id)
            text = self.tokenizer.decode(res.tokens[0])
            cut = min([text.find(s) for s in until if s and s in text], default=len(text))
            out.append(text[:cut])
        return out
