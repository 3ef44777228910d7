#!/usr/bin/env python3
"""Reference embeddings for the encoder parity test, made once with sentence-transformers.

    python3 -m venv .venv && .venv/bin/pip install sentence-transformers
    .venv/bin/python scripts/make-encoder-fixture.py [MODEL_DIR] [DTYPE]

MODEL_DIR defaults to the cached minilm-l6-v2 (scripts/fetch-models). Writes
tests/fixtures/minilm-l6-v2-embeddings.json: the texts, the model's max_seq_length, and
sentence-transformers' normalized embeddings (float32, rounded to 7 decimals). With DTYPE
(bfloat16, float16), the model computes in that type and the file is
minilm-l6-v2-embeddings-DTYPE.json: what `[embed] dtype` is checked against.
"""
import json
import os
import sys
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer

cache = Path(os.environ.get("ABRIDGE_CACHE", Path.home() / ".cache" / "abridge"))
model_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else cache / "models" / "minilm-l6-v2"
dtype = sys.argv[2] if len(sys.argv) > 2 else "float32"
suffix = "" if dtype == "float32" else f"-{dtype}"
out = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / f"minilm-l6-v2-embeddings{suffix}.json"

long_en = " ".join(
    f"Step {i}: the VPN client on the {i}th laptop disconnected again after the update."
    for i in range(90)
)
long_zh = "打印机离线，" * 400
texts = [
    "The printer on the second floor shows as offline.",
    "My laptop does not start since this morning; the power LED blinks three times.",
    "VPN keeps disconnecting every 5 minutes when working from home",
    "在家办公时VPN每5分钟就断开一次。",
    "发票重复扣款，请退还。",
    "Outlook 启动即崩溃 after the update 🙁🔥",
    "🚀🚀🚀",
    "Ünïcödé àccents, CAPITALS and    extra   spaces",
    "",
    " \t\n ",
    "\u200b\u200b",
    "a",
    long_en,
    long_zh,
    long_en + " " + long_zh,
]

model = SentenceTransformer(str(model_dir), device="cpu", model_kwargs={"dtype": getattr(torch, dtype)})
vectors = model.encode(texts, batch_size=4, normalize_embeddings=True, convert_to_tensor=True)
vectors = vectors.float().numpy()
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(
    json.dumps(
        {
            "model": model_dir.name,
            "dtype": dtype,
            "max_seq_length": model.max_seq_length,
            "texts": texts,
            "embeddings": [[round(float(x), 7) for x in v] for v in vectors],
        },
        ensure_ascii=False,
    )
    + "\n"
)
print(f"wrote {len(texts)} embeddings of dimension {vectors.shape[1]} to {out}")
