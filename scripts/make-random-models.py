#!/usr/bin/env python3
"""Random-weight stand-ins for the real models, made where the real ones cannot be carried
(a GPU machine with no network and little room to upload): the MiniLM sentence-encoder
layout with fresh BERT weights, and a Llama decoder in Hugging Face layout (SmolLM2-135M's
shape by default) with a small byte-level BPE tokenizer trained here. Speed and engine behaviour
(batching, PagedAttention, parity of two implementations on the same weights) do not
depend on trained weights; summaries from them are nonsense.

    python3 scripts/make-random-models.py TOKENIZER_DIR OUT_DIR [--small]

TOKENIZER_DIR holds the sentence-transformers files of all-MiniLM-L6-v2 (tokenizer.json,
modules.json, 1_Pooling/ ...); OUT_DIR gets encoder/ and llama/. Needs torch, transformers.
"""
import argparse
import json
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

# What the BPE tokenizer learns its merges from; any text works (byte-level BPE can
# encode every input), help-desk words make the token counts resemble a real model's.
CORPUS = """The printer is offline again and print jobs are stuck in the queue.
My VPN connection drops every few minutes when I work from home over wifi.
Password reset did not work, the account is locked and I cannot log in.
Outlook says the mailbox is full; shared mailbox emails are not delivered.
The invoice was charged twice, please refund the second payment.
Laptop does not start after the update, black screen, fan is running.
打印机离线，打印任务卡在队列中。网络连接断开。账户被锁定，无法登录。邮箱已满。"""


def bpe_tokenizer(path, vocab_size=2048):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([CORPUS] * 20, trainer)
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
         "model_max_length": 4096, "tokenizer_class": "PreTrainedTokenizerFast"}))
    return tokenizer.get_vocab_size()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("tokenizer_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--small", action="store_true", help="a 2-layer decoder, for tests")
    args = parser.parse_args()
    torch.manual_seed(7)

    encoder = args.out_dir / "encoder"
    shutil.copytree(args.tokenizer_dir, encoder, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("model.safetensors", "*.bin", ".abridge-ok"))
    config = BertConfig.from_pretrained(encoder)
    BertModel(config, add_pooling_layer=False).save_pretrained(encoder)

    llama = args.out_dir / "llama"
    llama.mkdir(parents=True, exist_ok=True)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2) if args.small else dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3)
    vocab_size = bpe_tokenizer(llama)
    config = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=4096,
                         rope_theta=100000.0, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, **shape)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(llama)
    # transformers 5 writes rope settings as `rope_parameters`; mistral.rs reads the
    # older top-level keys.
    saved = json.loads((llama / "config.json").read_text())
    saved.setdefault("rope_theta", saved.get("rope_parameters", {}).get("rope_theta", 100000.0))
    (llama / "config.json").write_text(json.dumps(saved, indent=2))
    print(f"random encoder -> {encoder}\nrandom llama -> {llama}")


if __name__ == "__main__":
    main()
