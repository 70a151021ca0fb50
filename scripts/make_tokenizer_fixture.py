#!/usr/bin/env python3
"""Makes tests/fixtures/tokenizer-vocab: a Qwen-style tokenizer saved *without* tokenizer.json —
vocab.json + merges.txt (+ tokenizer_config.json with added_tokens_decoder, added_tokens.json,
special_tokens_map.json), as the Omni and VL processor repos ship it — and expected.json: the ids
and decoded text that transformers' own slow→fast conversion (Qwen2Tokenizer built from those
files) gives for texts with Unicode, digits, code and every special and added token.

The vocabulary is the bundled model's (models/tiny-moe/tokenizer.json), with Qwen's reasoning and
tool tokens added after it. Rerun:

    pip install transformers==5.17.0   # no torch needed
    python3 scripts/make_tokenizer_fixture.py
"""
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests/fixtures/tokenizer-vocab"

TEXTS = [
    "Hello world! The capital of France is Paris.",
    "café ☕ naïve — ünïcödé, 東京タワー, ١٢٣, emoji 🙂👍🏽",
    "Numbers 12345, 3.14159 and 1,000,000; dates 2026-11-30.",
    "def f(x):\n    return x * 2  # doubled\n\n\tindented\r\nwindows line",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    "<|im_start|>assistant\n<think>\nreasoning here\n</think>\n\nThe answer.<|im_end|><|endoftext|>",
    "<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call> <tool_response>ok</tool_response>",
    "   leading spaces, trailing spaces   ",
    "",
]


def main():
    from transformers import AutoTokenizer

    OUT.mkdir(parents=True, exist_ok=True)
    t = json.loads((ROOT / "models/tiny-moe/tokenizer.json").read_text())
    model = t["model"]
    (OUT / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    with open(OUT / "merges.txt", "w") as f:
        f.write("#version: 0.2\n")
        for m in model["merges"]:
            f.write((m if isinstance(m, str) else " ".join(m)) + "\n")
    base = len(model["vocab"])
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    extra_special = ["<think>", "</think>", "<|vision_start|>", "<|vision_end|>"]
    extra_plain = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
    decoder = {}
    for a in t["added_tokens"]:
        decoder[str(a["id"])] = {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
    next_id = base
    for content, special in [(c, True) for c in extra_special] + [(c, False) for c in extra_plain]:
        decoder[str(next_id)] = {"content": content, "lstrip": False, "normalized": not special,
                                 "rstrip": False, "single_word": False, "special": special}
        next_id += 1
    cfg = json.loads((ROOT / "models/tiny-moe/tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg["added_tokens_decoder"] = decoder
    (OUT / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    added = {d["content"]: int(i) for i, d in decoder.items() if int(i) >= base}
    (OUT / "added_tokens.json").write_text(json.dumps(added, indent=2) + "\n")
    (OUT / "special_tokens_map.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "additional_special_tokens": specials + extra_special}, indent=2) + "\n")

    tok = AutoTokenizer.from_pretrained(str(OUT))
    assert not (OUT / "tokenizer.json").exists(), "the fixture must stay without tokenizer.json"
    cases = []
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        cases.append({
            "text": text,
            "ids": ids,
            "decoded": tok.decode(ids, skip_special_tokens=True),
            "decoded_with_special": tok.decode(ids, skip_special_tokens=False),
        })
    (OUT / "expected.json").write_text(json.dumps({
        "made_by": "transformers " + __import__("transformers").__version__ + " " + type(tok).__name__,
        "vocab_size": len(tok),
        "cases": cases}, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {OUT}: {len(cases)} cases, vocabulary {len(tok)}")


if __name__ == "__main__":
    main()
