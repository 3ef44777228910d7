#!/usr/bin/env python3
"""Make tests/fixtures/rouge-score-pairs.json: candidate/reference pairs with the scores
Google's rouge-score gives them, which abridge's ROUGE must reproduce to 1e-6.

    ~/.cache/abridge/rouge-venv/bin/python scripts/make-rouge-fixture.py
    (python3 -m venv ~/.cache/abridge/rouge-venv && \
     ~/.cache/abridge/rouge-venv/bin/pip install rouge-score==0.1.2 nltk==3.10.4)

The pairs are seeded and varied: English help-desk prose with inflections (for the
stemmer), Chinese, mixed Chinese/English, punctuation, digits, case, accents, emoji,
full-width and Korean characters (not [a-z0-9], so not tokens), empty texts, identical
texts, and a few very long texts.

rouge-score drops CJK characters (its tokens are [a-z0-9]+), while abridge scores each
Han/kana character as a token (DESIGN.md). For pairs with such characters, the reference
scores are rouge-score's on the text with each CJK character replaced by an ASCII word
standing for it alone (`cjk` + its code point in hex, spaces around): "rouge-score run on
space-separated characters", through rouge-score's own tokenizer. Those pairs are scored
without stemming (the stand-in words are not English); the others with and without.
"""
import json
import random
import re
import sys
from pathlib import Path

from rouge_score import rouge_scorer

# Keep in step with operators/src/quality/rouge.rs `is_cjk`.
CJK_RANGES = [
    (0x3040, 0x309F), (0x30A0, 0x30FF), (0x31F0, 0x31FF), (0x3400, 0x4DBF),
    (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x323AF),
]


def is_cjk(c):
    o = ord(c)
    return any(lo <= o <= hi for lo, hi in CJK_RANGES)


def spell_out_cjk(text):
    return "".join(f" cjk{ord(c):x} " if is_cjk(c) else c for c in text)


ENGLISH = """the a an user users printer printers printing printed print queue queues stuck
offline online again cannot can't log login logged logging password passwords reset resets
resetting locked account accounts vpn connection connections connected connecting connects
drops dropped dropping network networks wifi laptop laptops screen black boot boots booting
restarted restart restarting invoice invoices refund refunded charged twice payment payments
mailbox mailboxes full shared email emails delivered delivery phishing suspicious malware
crashes crashed crashing application applications install installation installed license
licenses licensing ticket tickets summary summaries relational conditional generalization
generalizations hopefulness effectiveness happily happy happiness replacement adjustment
adoption controlling controlled agreed feed plastered motoring troubled sizing hopping
falling filing flies dies died dying lying skies news innings proceeding exceeded succeed
is are was were be been being have has had do does did will would should could of to in on
at by for with from into over after before during since until because although""".split()

CHINESE = list("打印机离线网络连接断开账户被锁定软件崩溃发票和退款钓鱼邮件邮箱已满笔记本电脑无法开机"
               "用户反映今天上午系统出现故障请尽快处理谢谢已经重启过问题仍然存在需要技术支持")
JAPANESE = list("ひらがなカタカナプリンターが動きませんネットワーク")
ODD = ["café", "naïve", "ＡＢＣ", "🙂", "🚀", "한국어", "İstanbul", "Straße", "ﬁle", "x²", "½"]
PUNCT = list(".,;:!?-—()[]{}'\"/\\@#%&*+=<>|~`") + ["...", " - ", "\n", "\t", "  "]


def english_words(rng, n):
    words = [rng.choice(ENGLISH) for _ in range(n)]
    out = []
    for w in words:
        r = rng.random()
        if r < 0.1:
            w = w.capitalize()
        elif r < 0.13:
            w = w.upper()
        elif r < 0.16:
            w = f"{w}{rng.randint(0, 999)}"
        out.append(w)
    return out


def join_english(rng, words, punctuate):
    parts = []
    for w in words:
        parts.append(w)
        if punctuate and rng.random() < 0.25:
            parts.append(rng.choice(PUNCT))
        else:
            parts.append(" ")
    return "".join(parts).strip()


def chinese(rng, n):
    return "".join(rng.choice(CHINESE) for _ in range(n))


def perturb(rng, tokens):
    """A candidate: the reference's tokens dropped, swapped, replaced and extended."""
    out = [t for t in tokens if rng.random() > 0.25]
    for _ in range(rng.randint(0, 3)):
        if len(out) > 1:
            i, j = rng.randrange(len(out)), rng.randrange(len(out))
            out[i], out[j] = out[j], out[i]
    for i in range(len(out)):
        if rng.random() < 0.15:
            out[i] = rng.choice(tokens) if tokens else out[i]
    if rng.random() < 0.5 and tokens:
        out += rng.sample(tokens, min(len(tokens), rng.randint(0, 4)))
    return out


def make_pairs(rng):
    pairs = []
    # English, plain and punctuated.
    for k in range(320):
        ref = english_words(rng, rng.randint(1, 60))
        cand = perturb(rng, ref)
        punct = k % 2 == 1
        pairs.append((join_english(rng, cand, punct), join_english(rng, ref, punct)))
    # Chinese.
    for _ in range(220):
        ref = list(chinese(rng, rng.randint(1, 80)))
        cand = perturb(rng, ref)
        sep = rng.choice(["", "", "，", " "])
        pairs.append((sep.join(cand), "".join(ref)))
    # Mixed Chinese and English, Japanese kana.
    for _ in range(200):
        ref = []
        for _ in range(rng.randint(1, 20)):
            ref.append(rng.choice(ENGLISH) if rng.random() < 0.4 else chinese(rng, rng.randint(1, 4)))
        if rng.random() < 0.2:
            ref.append("".join(rng.choice(JAPANESE) for _ in range(rng.randint(1, 6))))
        cand = perturb(rng, ref)
        pairs.append(("".join(w if rng.random() < 0.5 else f" {w} " for w in cand), " ".join(ref)))
    # Odd characters, punctuation only, digits.
    for _ in range(120):
        ref = english_words(rng, rng.randint(0, 15)) + rng.sample(ODD, rng.randint(1, 4))
        rng.shuffle(ref)
        cand = perturb(rng, ref) + [rng.choice(PUNCT)]
        pairs.append((" ".join(cand), " ".join(ref)))
    for _ in range(30):
        junk = "".join(rng.choice(PUNCT + ODD[3:5]) for _ in range(rng.randint(0, 12)))
        pairs.append((junk, join_english(rng, english_words(rng, rng.randint(0, 5)), True)))
    # Empty sides and identical texts.
    for _ in range(30):
        text = join_english(rng, english_words(rng, rng.randint(1, 10)), True)
        pairs += [("", text), (text, ""), ("", "")]
    for _ in range(60):
        text = rng.choice([
            join_english(rng, english_words(rng, rng.randint(1, 30)), True),
            chinese(rng, rng.randint(1, 30)),
        ])
        pairs.append((text, text))
    # A few very long texts (thousands of tokens).
    for _ in range(6):
        ref = english_words(rng, rng.randint(1500, 3000))
        pairs.append((join_english(rng, perturb(rng, ref), True), join_english(rng, ref, False)))
    for _ in range(4):
        ref = list(chinese(rng, rng.randint(1500, 2500)))
        pairs.append(("".join(perturb(rng, ref)), "".join(ref)))
    return pairs


def main():
    rng = random.Random(20261127)
    kinds = ["rouge1", "rouge2", "rougeL"]
    plain = rouge_scorer.RougeScorer(kinds, use_stemmer=False)
    stemmed = rouge_scorer.RougeScorer(kinds, use_stemmer=True)
    out = []
    for candidate, reference in make_pairs(rng):
        has_cjk = any(is_cjk(c) for c in candidate + reference)
        scorers = [(False, plain)] if has_cjk else [(False, plain), (True, stemmed)]
        for stem, scorer in scorers:
            if has_cjk:
                s = scorer.score(spell_out_cjk(reference), spell_out_cjk(candidate))
            else:
                s = scorer.score(reference, candidate)
            out.append({
                "candidate": candidate,
                "reference": reference,
                "stem": stem,
                **{k: [s[k].precision, s[k].recall, s[k].fmeasure] for k in kinds},
            })
    path = Path(__file__).resolve().parent.parent / "tests/fixtures/rouge-score-pairs.json"
    path.write_text(json.dumps(out, ensure_ascii=False, separators=(",", ":")) + "\n")
    print(f"{len(out)} scored pairs -> {path} ({path.stat().st_size // 1024} KiB)", file=sys.stderr)


if __name__ == "__main__":
    main()
