#!/usr/bin/env python3
"""Make tests/fixtures/smollm2-reference.json: what transformers computes for the cached
SmolLM2-135M-Instruct Q4_1 GGUF (dequantized to float32 by its GGUF loader), which
abridge's own Llama must reproduce: the chat template's text, the token ids, logits of the
last prompt position (the 64 largest and 64 fixed ids) and 16 greedy tokens per prompt.

    ~/.cache/abridge/st-venv/bin/python scripts/make-llama-fixture.py [GGUF] [OUT]
    (any Python with torch, transformers, accelerate and gguf)

The prompts have no digits: llama.cpp's `smollm` pre-tokenizer (which abridge follows)
splits numbers into single digits, transformers' GGUF tokenizer does not.
"""
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

CACHE = Path.home() / ".cache/abridge/models/smollm2-135m-instruct"
GGUF = Path(sys.argv[1]) if len(sys.argv) > 1 else CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("tests/fixtures/smollm2-reference.json")

PROMPTS = [
    "Summarize in one sentence: the printer on the third floor is offline again and print "
    "jobs are stuck in the queue since this morning.",
    "Summarize: VPN drops every few minutes when I work from home.",
    "Hi!",
]
FIXED_IDS = list(range(0, 49152, 768))


def main():
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
    model = AutoModelForCausalLM.from_pretrained(
        GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32
    ).eval()
    cases = []
    for prompt in PROMPTS:
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tok(text, add_special_tokens=False).input_ids
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
            # Greedy as the argmax of whole-sequence forwards (`generate` with its cache
            # drifted from them by 0.2 in a logit here, enough to flip a close pair).
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
            "fixed_logits": [round(logits[i].item(), 5) for i in FIXED_IDS],
            "greedy": greedy,
        })
    OUT.write_text(json.dumps({
        "model": GGUF.name,
        "fixed_ids": FIXED_IDS,
        "cases": cases,
    }, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
