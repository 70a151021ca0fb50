#!/usr/bin/env python3
"""Build the bundled tiny MoE's training corpus and tokenizer from freely licensed Debian packages.

Run here (needs apt-get download, python3 with `tokenizers` and `numpy`; ~2 minutes):
    python3 scripts/build_corpus.py [--out .device/tiny-moe-data]
Writes:
    models/tiny-moe/tokenizer.json, tokenizer_config.json   (byte-level BPE, Qwen special tokens,
                                                              ChatML chat template)
    OUT/train.bin, OUT/valid.bin   uint16 token ids, documents separated by <|endoftext|>
    OUT/corpus.json                sources, licences, document and token counts
Then train on the GPU machine with scripts/train_tiny_moe.py (it reads OUT).

Sources (all from Debian 12 packages; licences in each package's /usr/share/doc/*/copyright):
  wordnet-base   WordNet 3.0 glosses and example sentences   WordNet 3.0 licence (BSD-style)
  python3.11-doc Python documentation prose and FAQ          PSF License
  fortunes-min   fortune cookies, literature quotes, riddles BSD (fortune-mod)
The WordNet glosses also become instruction pairs ("What is a dog?" -> "A dog is ..."), the
Python FAQ becomes question/answer pairs, and simple arithmetic pairs are generated, so chat
prompts get on-topic answers.
"""
import argparse
import json
import random
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["wordnet-base", "python3.11-doc", "fortunes-min"]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2/3's pre-tokenizer split (numbers one digit at a time, contractions, words, punctuation).
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def chat(q, a):
    return f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n"


def fetch_packages(cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    root = cache / "root"
    for p in PACKAGES:
        if not list(cache.glob(f"{p}_*.deb")):
            subprocess.run(["apt-get", "download", p], cwd=cache, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for deb in cache.glob("*.deb"):
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    return root / "usr/share"


# ---------------------------------------------------------------- WordNet
def parse_wordnet(share: Path):
    """Yields (pos, lexfile, words, definition, examples) per synset."""
    for pos, fname in [("n", "data.noun"), ("v", "data.verb"), ("a", "data.adj"), ("r", "data.adv")]:
        for line in (share / "wordnet" / fname).read_text(encoding="latin-1").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue
            head, gloss = line.split("|", 1)
            f = head.split()
            lexfile = int(f[1])
            n = int(f[3], 16)
            words = [re.sub(r"\(.*\)$", "", f[4 + 2 * i]).replace("_", " ") for i in range(n)]
            parts = [p.strip() for p in gloss.strip().split(";")]
            defs = [p for p in parts if p and not p.startswith('"')]
            exs = [p.strip('"').strip() for p in parts if p.startswith('"')]
            if not defs:
                continue
            yield pos, lexfile, words, defs[0], [e for e in exs if len(e.split()) >= 3]


def article(word):
    if word[:1].isupper() or word[:1].isdigit():
        return word
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def sentence(s):
    s = s.strip()
    if not s:
        return s
    s = s[0].upper() + s[1:]
    return s if s[-1] in ".!?" else s + "."


def wordnet_docs(share: Path, rng: random.Random):
    defs_by_lexfile = {}
    examples = []
    pairs = []
    capitals = []
    for pos, lexfile, words, d, exs in parse_wordnet(share):
        w = words[0]
        if pos == "n":
            s = f"{article(w)} is {d}" if not w[:1].isupper() else f"{w} is {d}"
            s = sentence(s)
            q = rng.choice(["What is {x}?", "What is {x}?", "Define {x}.", "Tell me what {x} is.",
                            "What does the word \"{w}\" mean?", "Explain what {x} is."])
            pairs.append(chat(q.format(x=article(w) if not w[:1].isupper() else w, w=w), s))
            m = re.match(r"^the capital(?: and largest city)? of ([A-Z][\w .'-]+?)(?:[;,]|$| and| on| in| near| located)", d)
            if m and w[:1].isupper():
                place = m.group(1).strip()
                capitals.append((place, w))
        elif pos == "v":
            s = sentence(f"to {w} is to {d}")
            pairs.append(chat(rng.choice(["What does it mean to {w}?", "What does \"{w}\" mean?"]).format(w=w), s))
        else:
            s = sentence(f"\"{w}\" means {d}")
        defs_by_lexfile.setdefault(lexfile, []).append(s)
        for e in exs:
            examples.append(sentence(e))
            if pos == "n" and w.lower() in e.lower() and rng.random() < 0.5:
                pairs.append(chat(rng.choice([
                    "Write a sentence about {w}.", "Use the word \"{w}\" in a sentence.",
                    "Give me an example with {w}."]).format(w=w), sentence(e)))
    for place, city in capitals:
        for q in [f"What is the capital of {place}?", f"Which city is the capital of {place}?"]:
            pairs.append(chat(q, f"The capital of {place} is {city}."))
    docs = []
    for lexfile, sents in defs_by_lexfile.items():
        for i in range(0, len(sents), 8):
            docs.append(" ".join(sents[i:i + 8]))
    rng.shuffle(examples)
    for i in range(0, len(examples), 6):
        docs.append(" ".join(examples[i:i + 6]))
    return docs, pairs, len(capitals)


# ---------------------------------------------------------------- Python docs
RST_ROLE = re.compile(r":[\w:.-]+:`([^`<]*?)(?:\s*<[^>]*>)?`")
RST_LINK = re.compile(r"`([^`<]+?)\s*<[^>]+>`_+")


def clean_rst(text):
    out, skip_indent = [], None
    for line in text.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if stripped and indent <= skip_indent:
                skip_indent = None
            else:
                continue
        if stripped.startswith(".. ") or stripped.startswith(">>>") or stripped.startswith("..."):
            skip_indent = indent
            continue
        if re.fullmatch(r"[=\-~^*#+\"']{3,}", stripped):
            continue
        if stripped.endswith("::"):
            line = line.rstrip(":") + ("." if stripped != "::" else "")
            skip_indent = indent
        out.append(line)
    text = "\n".join(out)
    text = RST_ROLE.sub(r"\1", text)
    text = RST_LINK.sub(r"\1", text)
    text = text.replace("``", "").replace("**", "").replace("*", "").replace("|", "")
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    good = []
    for p in paras:
        words = p.split()
        if len(words) < 12 or not p[:1].isalpha() or p.count("(") > 6:
            continue
        if sum(c.isalpha() for c in p) / max(1, len(p)) < 0.7:
            continue
        good.append(p)
    return good


def python_docs(share: Path):
    src = share / "doc/python3.11/html/_sources"
    docs, pairs = [], []
    for sub in ["tutorial", "faq", "howto", "glossary.rst.txt", "reference", "library"]:
        paths = [src / sub] if sub.endswith(".txt") else sorted((src / sub).rglob("*.rst.txt"))
        for p in paths:
            text = p.read_text(encoding="utf-8", errors="replace")
            paras = clean_rst(text)
            for i in range(0, len(paras), 3):
                docs.append("\n\n".join(paras[i:i + 3]))
            if sub == "faq":
                # "Question?\n-----\n\nAnswer paragraph" → a chat pair
                for m in re.finditer(r"\n([A-Z][^\n]{8,120}\?)\n[-=~^]{3,}\n\n(.+?)(?:\n\n|\Z)", text, re.S):
                    q = " ".join(m.group(1).split())
                    a = clean_rst(m.group(2) + "\n")
                    if a:
                        pairs.append(chat(q, a[0]))
    return docs, pairs


# ---------------------------------------------------------------- fortunes, arithmetic
def fortunes(share: Path):
    docs = []
    for name in ["fortunes", "literature", "riddles"]:
        text = (share / "games/fortunes" / name).read_text(encoding="utf-8", errors="replace")
        for f in text.split("\n%\n"):
            f = f.strip()
            if 20 <= len(f) <= 600:
                docs.append(f)
    return docs


def arithmetic(rng: random.Random, n=6000):
    pairs = []
    for _ in range(n):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        op = rng.choice(["+", "+", "-", "*"])
        if op == "-" and b > a:
            a, b = b, a
        r = {"+": a + b, "-": a - b, "*": a * b}[op]
        q = rng.choice(["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?"])
        pairs.append(chat(q.format(a=a, b=b, op=op), f"{a} {op} {b} = {r}."))
    return pairs


# ---------------------------------------------------------------- tokenizer
def train_tokenizer(texts, vocab_size, dest: Path):
    from tokenizers import Tokenizer, Regex, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    dest.mkdir(parents=True, exist_ok=True)
    tok.save(str(dest / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 1024,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(tok.token_to_id(s)): {"content": s, "special": True, "lstrip": False, "rstrip": False,
                                      "normalized": False, "single_word": False} for s in SPECIAL
        },
    }
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return tok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / ".device/tiny-moe-data"))
    ap.add_argument("--cache", default="/tmp/moescope-corpus-debs")
    ap.add_argument("--vocab", type=int, default=4096)
    args = ap.parse_args()
    import numpy as np

    rng = random.Random(20261125)
    share = fetch_packages(Path(args.cache))
    wn_docs, wn_pairs, n_caps = wordnet_docs(share, rng)
    py_docs, py_pairs = python_docs(share)
    fort = fortunes(share)
    arith = arithmetic(rng)
    groups = {
        "wordnet_definitions_and_examples": wn_docs,
        "wordnet_instruction_pairs": wn_pairs,
        "python_docs_prose": py_docs,
        "python_faq_pairs": py_pairs,
        "fortunes": fort,
        "arithmetic_pairs": arith,
    }
    docs = [d for g in groups.values() for d in g]
    rng.shuffle(docs)
    n_valid = max(200, len(docs) // 50)
    valid, train = docs[:n_valid], docs[n_valid:]

    model_dir = ROOT / "models/tiny-moe"
    tok = train_tokenizer(train, args.vocab, model_dir)
    eot = tok.token_to_id("<|endoftext|>")

    def encode(ds):
        ids = []
        for enc in tok.encode_batch(ds, add_special_tokens=False):
            ids.extend(enc.ids)
            ids.append(eot)
        return np.array(ids, dtype=np.uint16)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tr, va = encode(train), encode(valid)
    tr.tofile(out / "train.bin")
    va.tofile(out / "valid.bin")
    meta = {
        "vocab_size": tok.get_vocab_size(),
        "train_tokens": int(tr.size),
        "valid_tokens": int(va.size),
        "documents": {k: len(v) for k, v in groups.items()},
        "capital_pairs": n_caps,
        "sources": {
            "wordnet-base (Debian 12)": "WordNet 3.0 licence (Princeton; BSD-style, attribution)",
            "python3.11-doc (Debian 12)": "Python Software Foundation License",
            "fortunes-min (Debian 12)": "BSD (fortune-mod)",
            "arithmetic pairs": "generated by this script",
        },
    }
    (out / "corpus.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    sys.exit(main())
