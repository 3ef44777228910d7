#!/usr/bin/env python3
"""Make tests/fixtures/bloom-tiny-*: random-weight BLOOM checkpoints in Hugging Face layout
with what transformers computes for them, which abridge's BLOOM must reproduce (logits to
1e-4, greedy tokens exactly).

    ~/.cache/abridge/st-venv/bin/python scripts/make-bloom-fixture.py
    (any Python with torch, transformers and tokenizers)
    ... make-bloom-fixture.py --shape-560m DIR   # BLOOM-560m's shape, random (benchmarks)
    ... make-bloom-fixture.py --shape LAYERS HIDDEN HEADS DIR   # any shape, random (std 0.2)
    ... make-bloom-fixture.py --half   # expected-half.json beside each fixture's expected.json

Two shapes: 4 heads (a power of two) and 6 heads (not: ALiBi slopes then interleave a
second series). Each folder holds config.json, tokenizer.json (a small byte-level BPE
trained here), the weights (model.safetensors for 4 heads, pytorch_model.bin for 6: both
layouts that checkpoints come in), and expected.json: the logits of single sequences, of a
left-padded batch of different lengths (real positions only), and 20 greedy tokens.
"""
import json
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import BloomConfig, BloomForCausalLM

CORPUS = """The printer is offline again and print jobs are stuck in the queue.
My VPN connection drops every few minutes when I work from home over wifi.
打印机离线，打印任务卡在队列中。网络连接断开。账户被锁定，无法登录。
输入: 今天上午系统出现故障 抽取: 故障 输出: [GEN]"""

PROMPTS = [
    "The printer is offline",
    "VPN drops every few minutes when I work from home",
    "打印机离线",
    "a",
]


def tokenizer(path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS] * 10, trainer)
    tok.save(str(path / "tokenizer.json"))
    return tok


def rounded(tensor):
    return [round(float(x), 6) for x in tensor.flatten()]


def make(name, heads, hidden, weights):
    out = Path(__file__).resolve().parent.parent / "tests/fixtures" / name
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer(out)
    torch.manual_seed(heads)
    config = BloomConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, n_layer=2,
                         n_head=heads, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model = BloomForCausalLM(config).eval()
    # Larger than the default init (std 0.02), so that attention and ALiBi matter.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    if weights == "safetensors":
        model.save_pretrained(out)
    else:
        # The older layout (SeqGPT-560M's): a pickled state dict, as torch.save writes it.
        config.architectures = ["BloomForCausalLM"]
        config.save_pretrained(out)
        torch.save(model.state_dict(), out / "pytorch_model.bin")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "padding_side": "left"}))

    expected = {"single": [], "batch": {}, "greedy": []}
    ids = [tok.encode(p).ids for p in PROMPTS]
    with torch.no_grad():
        for seq in ids:
            logits = model(torch.tensor([seq])).logits[0]
            expected["single"].append({"ids": seq, "logits": rounded(logits)})
        # Left padding: real tokens at the end, attention mask 0 on the pads.
        longest = max(len(s) for s in ids)
        batch = [[config.pad_token_id] * (longest - len(s)) + s for s in ids]
        mask = [[0] * (longest - len(s)) + [1] * len(s) for s in ids]
        logits = model(torch.tensor(batch), attention_mask=torch.tensor(mask)).logits
        expected["batch"] = {
            "ids": batch,
            "mask": mask,
            # Only real positions: a pad's logits are whatever the masked softmax gives.
            "logits": [rounded(logits[i, longest - len(s):]) for i, s in enumerate(ids)],
        }
        for seq in ids[:2]:
            generated = model.generate(torch.tensor([seq]), max_new_tokens=20, min_new_tokens=20,
                                       do_sample=False, pad_token_id=config.pad_token_id)
            expected["greedy"].append({"ids": seq, "tokens": generated[0, len(seq):].tolist()})
    (out / "expected.json").write_text(json.dumps(expected, separators=(",", ":")) + "\n")
    print(f"{out}: vocab {config.vocab_size}, hidden {hidden}, heads {heads}")


def random_shape(out, layers, hidden, heads, half=False, vocab=0, std=0.0):
    """A BLOOM of any shape with random weights (float16 when `half`), with the tiny
    tokenizer: for benchmarks (what a forward pass costs does not depend on trained
    weights) and for checking one implementation against another on the same weights
    (e.g. the CUDA kernels, which take head sizes of 64 and up, against the CPU path)."""
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = tokenizer(out).get_vocab_size()
    if vocab:
        vocab_size = vocab
    torch.manual_seed(560)
    config = BloomConfig(vocab_size=vocab_size, hidden_size=hidden, n_layer=layers, n_head=heads,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model = BloomForCausalLM(config).eval()
    if std:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, std)
    if half:
        model = model.half()
    model.save_pretrained(out)
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "padding_side": "left"}))
    print(f"{out}: BLOOM with {layers} layers, hidden {hidden}, {heads} heads, random weights")


def half(name):
    """expected-half.json: what transformers computes for a fixture's checkpoint loaded in
    float16 and bfloat16 on the CPU (every position's logits of the single prompts, widened
    to float32 exactly, and 20 greedy tokens with the smallest margin between the best and
    the second-best logit over the steps: a step whose margin is within rounding may go
    either way in another implementation, so the test compares only greedy runs whose
    margins allow it)."""
    out = Path(__file__).resolve().parent.parent / "tests/fixtures" / name
    expected = json.loads((out / "expected.json").read_text())
    result = {"torch": torch.__version__}
    for dtype in ("float16", "bfloat16"):
        model = BloomForCausalLM.from_pretrained(out, torch_dtype=getattr(torch, dtype)).eval()
        single, greedy = [], []
        with torch.no_grad():
            for case in expected["single"]:
                logits = model(torch.tensor([case["ids"]])).logits[0].float()
                single.append({"ids": case["ids"], "logits": rounded(logits)})
            for case in expected["greedy"]:
                generated = model.generate(torch.tensor([case["ids"]]), max_new_tokens=20,
                                           min_new_tokens=20, do_sample=False,
                                           output_scores=True, return_dict_in_generate=True,
                                           pad_token_id=model.config.pad_token_id)
                margins = [float(s[0].float().topk(2).values.diff().abs()[0])
                           for s in generated.scores]
                greedy.append({"ids": case["ids"],
                               "tokens": generated.sequences[0, len(case["ids"]):].tolist(),
                               "smallest_margin": min(margins)})
        result[dtype] = {"single": single, "greedy": greedy}
    (out / "expected-half.json").write_text(json.dumps(result, separators=(",", ":")) + "\n")
    print(f"{out}/expected-half.json")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--shape-560m":
        # BLOOM-560m's shape (SeqGPT-560M's), stored in float16 as SeqGPT-560M is.
        random_shape(Path(sys.argv[2]), 24, 1024, 16, half=True, vocab=250880)
    elif len(sys.argv) == 6 and sys.argv[1] == "--shape":
        layers, hidden, heads = (int(x) for x in sys.argv[2:5])
        # Weights at std 0.2, as the fixtures': clear argmaxes, attention that matters.
        random_shape(Path(sys.argv[5]), layers, hidden, heads, std=0.2)
    elif sys.argv[1:] == ["--half"]:
        half("bloom-tiny-4h")
        half("bloom-tiny-6h")
    else:
        make("bloom-tiny-4h", heads=4, hidden=64, weights="safetensors")
        make("bloom-tiny-6h", heads=6, hidden=96, weights="bin")
