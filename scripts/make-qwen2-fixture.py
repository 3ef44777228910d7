#!/usr/bin/env python3
"""Make the Qwen2 fixtures that abridge's own engine (`backend = "llama"`) is tested against:

    ~/.cache/abridge/st-venv/bin/python scripts/make-qwen2-fixture.py tiny
        tests/fixtures/qwen2-tiny.gguf: a random Qwen2 (2 layers, width 64, 4 heads over 2
        key/value heads, biases on q, k, v) with a small byte-level BPE vocabulary trained
        here under Qwen2's pre-tokenizer, Qwen2.5's ChatML template; and
        tests/fixtures/qwen2-tiny-reference.json: what transformers computes from that file.
    ~/.cache/abridge/st-venv/bin/python scripts/make-qwen2-fixture.py real
        tests/fixtures/qwen2.5-coder-reference.json: the same for the cached Qwen2.5 Coder
        0.5B Instruct GGUF (`scripts/fetch-models qwen`), dequantized by transformers.

(any Python with torch, transformers, accelerate, gguf and tokenizers.) Each reference holds,
per prompt, the chat template's text, token ids, last-position logits (the 64 largest and a
fixed set of ids) and 16 greedy tokens from whole-sequence forwards; and token ids of texts
that exercise the pre-tokenizer (digits, Chinese, contractions, runs of spaces, line breaks).
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

FIXTURES = Path(__file__).resolve().parent.parent / "tests/fixtures"
REAL = Path.home() / ".cache/abridge/models/qwen2.5-coder-0.5b-instruct"

PROMPTS = [
    "Summarize in one sentence: the printer on the third floor is offline again and 12 print "
    "jobs are stuck in the queue since 9:30 this morning.",
    "用一句话总结：三楼的打印机又离线了，队列里的任务卡住了。",
    "Hi!",
]
TEXTS = [
    "The VPN drops every 5 minutes; I've restarted it 3 times.",
    "  two  spaces,\ttabs\n\nand new lines\r\n",
    "邮箱已满，无法接收邮件。Outlook 2016 报错 0x800CCC0E",
    "It's fine, they'll say we'd done it, DON'T you?",
    "naïve café — ½ 1234567 ٣٤",
]
CORPUS = PROMPTS + TEXTS + [
    "The laptop does not start after the update, black screen, fan spins.",
    "Password reset did not work and my account is locked since Monday.",
    "Invoice 2024-117 was charged twice; please refund the second payment.",
    "Phishing email from a fake bank asks for my login, I clicked the link.",
    "笔记本电脑无法开机，更新以后一直黑屏。",
    "网络连接断开，无线网络每隔几分钟掉线。",
    "账户被锁定，密码重置后仍然无法登录。",
    "发票和退款：同一笔订单被扣款两次。",
]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2.5's ChatML template, as its GGUF files carry it (the tool-calling branches left out).
CHATML = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_vocabulary():
    """A byte-level BPE of ~600 tokens over CORPUS, split as Qwen2 splits."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def write_tiny_gguf(path):
    import gguf

    tokens, merges = train_vocabulary()
    tokens += SPECIAL
    vocab, hidden, heads, kv_heads, ffn, layers = len(tokens), 64, 4, 2, 160, 2
    head_dim = hidden // heads
    rng = np.random.default_rng(7)

    def rand(*shape, scale):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("abridge tiny random Qwen2")
    w.add_block_count(layers)
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(1_000_000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIAL else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    w.add_tensor("token_embd.weight", rand(vocab, hidden, scale=1.0))
    for i in range(layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", 1 + rand(hidden, scale=0.1))
        w.add_tensor(p + "attn_q.weight", rand(heads * head_dim, hidden, scale=0.25))
        w.add_tensor(p + "attn_q.bias", rand(heads * head_dim, scale=0.5))
        w.add_tensor(p + "attn_k.weight", rand(kv_heads * head_dim, hidden, scale=0.25))
        w.add_tensor(p + "attn_k.bias", rand(kv_heads * head_dim, scale=0.5))
        w.add_tensor(p + "attn_v.weight", rand(kv_heads * head_dim, hidden, scale=0.25))
        w.add_tensor(p + "attn_v.bias", rand(kv_heads * head_dim, scale=0.5))
        w.add_tensor(p + "attn_output.weight", rand(hidden, heads * head_dim, scale=0.15))
        w.add_tensor(p + "ffn_norm.weight", 1 + rand(hidden, scale=0.1))
        w.add_tensor(p + "ffn_gate.weight", rand(ffn, hidden, scale=0.15))
        w.add_tensor(p + "ffn_up.weight", rand(ffn, hidden, scale=0.15))
        w.add_tensor(p + "ffn_down.weight", rand(hidden, ffn, scale=0.1))
    w.add_tensor("output_norm.weight", 1 + rand(hidden, scale=0.1))
    w.add_tensor("output.weight", rand(vocab, hidden, scale=0.5))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def reference(gguf_path, out, fixed_ids):
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    cases = []
    for prompt in PROMPTS:
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tok(text, add_special_tokens=False).input_ids
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
            greedy = []
            for _ in range(16):
                step = model(torch.tensor([ids + greedy])).logits[0, -1]
                greedy.append(int(step.argmax()))
        top = torch.topk(logits, 64)
        cases.append({
            "prompt": prompt,
            "text": text,
            "ids": ids,
            "top_ids": top.indices.tolist(),
            "top_logits": [round(v, 5) for v in top.values.tolist()],
            "fixed_logits": [round(logits[i].item(), 5) for i in fixed_ids],
            "greedy": greedy,
        })
    texts = [{"text": t, "ids": tok(t, add_special_tokens=False).input_ids} for t in TEXTS]
    out.write_text(json.dumps({
        "model": gguf_path.name,
        "fixed_ids": fixed_ids,
        "cases": cases,
        "texts": texts,
    }, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {out}")


def main(which):
    torch.manual_seed(0)
    if which == "tiny":
        path = FIXTURES / "qwen2-tiny.gguf"
        write_tiny_gguf(path)
        reference(path, FIXTURES / "qwen2-tiny-reference.json", list(range(0, 600, 10)))
    elif which == "real":
        path = REAL / "qwen2.5-coder-0.5b-instruct.gguf"
        reference(path, FIXTURES / "qwen2.5-coder-reference.json",
                  list(range(0, 151936, 2400)))
    else:
        sys.exit("usage: make-qwen2-fixture.py tiny|real")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")
