"""Helpers for the Llama tests: tiny random HF models and tokenizer files."""
import base64

import torch

BPE_RANKS = 320  # tiktoken file written by write_tiktoken_file: 256 byte tokens + 64 merges
VOCAB = BPE_RANKS + 256  # + Llama 3's 256 special tokens

# tiny configurations: MHA / GQA, RoPE scaling on and off
TINY_CONFIGS = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "gqa_llama3_rope": dict(num_attention_heads=4, num_key_value_heads=2,
                            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                            rope_theta=500000.0),
}


def make_hf_model(kind="gqa", seed=0, **over):
    from transformers import LlamaConfig, LlamaForCausalLM
    kw = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=172, vocab_size=VOCAB,
              max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None,
              pad_token_id=None, tie_word_embeddings=False)
    kw.update(TINY_CONFIGS[kind])
    kw.update(over)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    # larger-than-default init so the logits are not all nearly equal (greedy ties)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


def write_tiktoken_file(path, text="hello world, the quick brown fox jumps over the lazy dog. hello again!"):
    """A BPE file: 256 single bytes plus merges learnt greedily from `text`."""
    ranks = {bytes([i]): i for i in range(256)}
    words = [list(w.encode()) for w in text.replace(" ", " \x00").split("\x00")]
    words = [[bytes([b]) for b in w] for w in words]
    while len(ranks) < BPE_RANKS:
        counts = {}
        for w in words:
            for a, b in zip(w, w[1:]):
                counts[a + b] = counts.get(a + b, 0) + 1
        counts = {k: v for k, v in counts.items() if k not in ranks}
        if not counts:
            break
        best = max(counts, key=lambda k: (counts[k], k))
        ranks[best] = len(ranks)
        new_words = []
        for w in words:
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] + w[i + 1] == best:
                    out.append(best)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words.append(out)
        words = new_words
    n = len(ranks)
    i = 0
    while len(ranks) < BPE_RANKS:  # pad with unused multi-byte tokens
        ranks[b"\xff\xfe" + bytes([i % 256, i // 256])] = n + i
        i += 1
    with open(path, "wb") as f:
        for tok, r in ranks.items():
            f.write(base64.b64encode(tok) + b" " + str(r).encode() + b"\n")
    return path




def make_tiny_model(seed=0, std=0.2, **over):
    """A tiny random fastzoo Transformer (fp32) whose linears all fit int4 group sizes 32/64."""
    from fastzoo.llama.config import LlamaConfig
    from fastzoo.llama.model import Transformer
    kw = dict(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128,
              max_position_embeddings=128, bos_token_id=None, eos_token_id=None)
    kw.update(over)
    torch.manual_seed(seed)
    model = Transformer(LlamaConfig(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, std)
    return model.eval()
