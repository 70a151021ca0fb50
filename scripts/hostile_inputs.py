#!/usr/bin/env python3
"""Structured mutations of real model files, each run through moescope: a hostile-input campaign
for the parts of loading that the libFuzzer harnesses stop short of (the weights themselves).

libFuzzer's `gguf` target parses a header and derives the config, tokenizer and expert
locations; it never reads a weight, so a tensor whose type, shape or offset disagrees with its
bytes only shows up when a model is built and run. Random bytes almost never get that far, so
this script mutates *one field* of a valid file at a time — a GGUF metadata value or tensor
record, a safetensors header entry, a field of `config.json`, of the shard index or of the tokenizer's files
(tokenizer.json, or vocab.json / merges.txt / added_tokens.json as a repo without tokenizer.json
ships them), or the bytes of a scale — writes the
result, and runs the CLI on it:

    generate --model M --prompt ... --max-new-tokens 3   (native, then selective at 25 %)
    verify M

A finding is a panic (exit 101), a death by signal, a run over the time limit, or a non-zero exit
with nothing said on stderr or stdout. Exit 0 is fine (many mutations are harmless: a changed author string);
a clear error with exit 1 or 2 is the expected answer to the rest.

    python3 scripts/hostile_inputs.py BIN [--rounds N] [--seed S] [--out DIR] [--timeout SEC]
                                          [--show-accepted] [--vocab-files-only]

BIN is a release build (`cargo build --release`; target/release/moescope). Seeds: every GGUF
file in tests/fixtures/gguf (llama.cpp's and moescope's writers, split models included) and the
FP8 and bf16 safetensors fixtures. Findings are copied under --out with the command and stderr.
Exit status: 0 when nothing was found, 1 otherwise.
"""

import argparse
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------- GGUF (v2/v3, little-endian)

SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


class Reader:
    def __init__(self, b):
        self.b, self.p = b, 0

    def take(self, fmt):
        v = struct.unpack_from(fmt, self.b, self.p)[0]
        self.p += struct.calcsize(fmt)
        return v

    def string(self):
        n = self.take("<Q")
        s = self.b[self.p:self.p + n]
        self.p += n
        return s

    def value(self, t):
        if t in SCALAR:
            return self.take(SCALAR[t])
        if t == STRING:
            return self.string()
        if t == ARRAY:
            et = self.take("<I")
            n = self.take("<Q")
            return (et, [self.value(et) for _ in range(n)])
        raise ValueError(f"type {t}")


def put_value(t, v):
    if t in SCALAR:
        return struct.pack(SCALAR[t], v)
    if t == STRING:
        return struct.pack("<Q", len(v)) + v
    et, items = v
    return struct.pack("<IQ", et, len(items)) + b"".join(put_value(et, x) for x in items)


def parse_gguf(b):
    r = Reader(b)
    assert r.take("<I") == 0x46554747, "not GGUF"
    version = r.take("<I")
    n_t, n_kv = r.take("<Q"), r.take("<Q")
    kvs = []
    for _ in range(n_kv):
        k = r.string()
        t = r.take("<I")
        kvs.append([k, t, r.value(t)])
    tensors = []
    for _ in range(n_t):
        name = r.string()
        nd = r.take("<I")
        dims = [r.take("<Q") for _ in range(nd)]
        ty = r.take("<I")
        off = r.take("<Q")
        tensors.append([name, dims, ty, off])
    align = 32
    for k, t, v in kvs:
        if k == b"general.alignment" and t in SCALAR:
            align = v
    start = (r.p + align - 1) // align * align
    return version, kvs, tensors, b[start:], align


def write_gguf(version, kvs, tensors, data, align):
    out = bytearray(struct.pack("<IIQQ", 0x46554747, version, len(tensors), len(kvs)))
    for k, t, v in kvs:
        out += struct.pack("<Q", len(k)) + k + struct.pack("<I", t) + put_value(t, v)
    for name, dims, ty, off in tensors:
        out += struct.pack("<Q", len(name)) + name + struct.pack("<I", len(dims))
        out += b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", ty, off)
    align = max(1, align) if isinstance(align, int) and 0 < align < 1 << 20 else 32
    out += b"\0" * ((-len(out)) % align)
    return bytes(out) + data


INT_EDGES = [0, 1, 2, 3, 7, 127, 128, 255, 256, 65535, 2**31 - 1, 2**32 - 1, 2**63 - 1, 2**64 - 1]


def edge_for(fmt, rng, v):
    if fmt in ("<f", "<d"):
        return rng.choice([0.0, -1.0, 1e-30, 1e30, float("nan"), float("inf"), -float("inf"), v * 2])
    if fmt == "<?":
        return not v
    size = struct.calcsize(fmt)
    signed = fmt.islower()
    lo, hi = (-(1 << (8 * size - 1)), (1 << (8 * size - 1)) - 1) if signed else (0, (1 << (8 * size)) - 1)
    cand = [x for x in INT_EDGES + [v + 1, v - 1, v * 2, v // 2, -1, -v] if lo <= x <= hi]
    return rng.choice(cand)


def mutate_value(rng, t, v, retype=True):
    """Returns (type, value): a near or extreme value of the same type, or another type."""
    if retype and rng.random() < 0.1:  # another type altogether
        nt = rng.choice([4, 5, 6, 8, 10])
        return nt, (b"x" if nt == STRING else edge_for(SCALAR[nt], rng, 0))
    if t in SCALAR:
        return t, edge_for(SCALAR[t], rng, v)
    if t == STRING:
        return t, rng.choice([b"", b"\xff\xfe", v[: len(v) // 2], v + b"\0x", b"llama", b"qwen2moe", b"{{ x.y.z }}{% for %}"])
    et, items = v
    choice = rng.randrange(5)
    if choice == 0 or not items:
        return t, (et, [])
    if choice == 1:
        return t, (et, items[: rng.randrange(len(items))])
    if choice == 2:
        return t, (et, items + items[: rng.randrange(1, 4)])
    i = rng.randrange(len(items))
    items = list(items)
    if et in SCALAR or et == STRING:
        items[i] = mutate_value(rng, et, items[i], retype=False)[1]
    return t, (et, items)


GGML_TYPES = list(range(0, 40)) + [255, 2**31]


def mutate_gguf(rng, b):
    version, kvs, tensors, data, align = parse_gguf(b)
    kind = rng.choice(["kv", "kv", "kv", "kv_drop", "t_type", "t_dims", "t_off", "t_drop", "t_name",
                       "t_dup", "data_trunc", "data_nan", "version"])
    what = kind
    if kind == "kv":
        i = rng.randrange(len(kvs))
        k, t, v = kvs[i]
        kvs[i][1], kvs[i][2] = mutate_value(rng, t, v)
        what = f"kv {k.decode(errors='replace')}"
    elif kind == "kv_drop":
        i = rng.randrange(len(kvs))
        what = f"drop kv {kvs[i][0].decode(errors='replace')}"
        del kvs[i]
    elif kind.startswith("t_") and not tensors:
        what = "no tensors"
    elif kind == "t_type":
        i = rng.randrange(len(tensors))
        tensors[i][2] = rng.choice(GGML_TYPES)
        what = f"type of {tensors[i][0].decode()} -> {tensors[i][2]}"
    elif kind == "t_dims":
        i = rng.randrange(len(tensors))
        dims = tensors[i][1]
        j = rng.randrange(len(dims)) if dims else 0
        op = rng.randrange(6)
        if op == 0 and dims:
            dims[j] += rng.choice([1, -1, 32, 256]) if dims[j] > 256 else 1
        elif op == 1 and dims:
            dims[j] = rng.choice([0, 1, 2**32, 2**62, 2**64 - 1])
        elif op == 2:
            dims.append(rng.choice([1, 2]))
        elif op == 3 and dims:
            dims.pop()
        elif op == 4 and len(dims) > 1:
            dims[0], dims[1] = dims[1], dims[0]
        else:
            dims.reverse()
        what = f"dims of {tensors[i][0].decode()} -> {dims}"
    elif kind == "t_off":
        i = rng.randrange(len(tensors))
        tensors[i][3] = rng.choice([tensors[i][3] + 1, tensors[i][3] + align, len(data), 2**63,
                                    2**64 - 1, 0, tensors[i][3] - align if tensors[i][3] >= align else 3])
        what = f"offset of {tensors[i][0].decode()} -> {tensors[i][3]}"
    elif kind == "t_drop":
        i = rng.randrange(len(tensors))
        what = f"drop tensor {tensors[i][0].decode()}"
        del tensors[i]
    elif kind == "t_name":
        i = rng.randrange(len(tensors))
        old = tensors[i][0]
        tensors[i][0] = rng.choice([old.replace(b"blk.", b"blk.9"), old + b".x", b"", old.upper(),
                                    old.replace(b"exps", b"exp")])
        what = f"rename {old.decode()} -> {tensors[i][0].decode(errors='replace')}"
    elif kind == "t_dup":
        i, j = rng.sample(range(len(tensors)), 2)
        tensors[j][0] = tensors[i][0]
        what = f"duplicate name {tensors[i][0].decode()}"
    elif kind == "data_trunc":
        data = data[: rng.randrange(len(data))]
        what = f"data cut to {len(data)}"
    elif kind == "data_nan":
        # A run of f16 NaN / Inf (block scales of every k-quant are f16) over one tensor's start.
        i = rng.randrange(len(tensors))
        off = tensors[i][3]
        pat = rng.choice([b"\x00\x7e", b"\x00\x7c", b"\xff\xff", b"\x00\x00\xc0\x7f"])
        n = rng.choice([2, 16, 256, 4096])
        data = bytearray(data)
        data[off:off + n] = (pat * n)[: len(data[off:off + n])]
        data = bytes(data)
        what = f"NaN/Inf bytes at {tensors[i][0].decode()}"
    elif kind == "version":
        version = rng.choice([0, 1, 2, 4, 2**32 - 1])
        what = f"version {version}"
    return write_gguf(version, kvs, tensors, data, align), what


# ---------------------------------------------------------------- safetensors directories

def mutate_safetensors(rng, b):
    n = struct.unpack_from("<Q", b)[0]
    header = json.loads(b[8:8 + n])
    data = b[8 + n:]
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    e = header[name]
    kind = rng.choice(["dtype", "shape", "offsets", "drop", "rename", "scale_bytes", "scale_bytes"])
    if kind == "scale_bytes":
        scales = [k for k in names if k.endswith("weight_scale_inv")] or names
        name = rng.choice(scales)
        e = header[name]
        a, z = e["data_offsets"]
        # f32 or bf16 scales: NaN, Inf, zero, negative, denormal
        pat = {"F32": [b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\x00\x00\x00\x00", b"\x00\x00\x80\xbf", b"\x01\x00\x00\x00"],
               "BF16": [b"\xc0\x7f", b"\x80\x7f", b"\x00\x00", b"\x80\xbf"]}.get(e["dtype"], [b"\xff"])
        p = rng.choice(pat)
        cnt = rng.choice([1, 4, (z - a) // len(p)])
        start = a + len(p) * rng.randrange(max(1, (z - a) // len(p) - cnt + 1))
        data = bytearray(data)
        data[start:start + cnt * len(p)] = (p * cnt)[: len(data[start:start + cnt * len(p)])]
        data = bytes(data)
        what = f"bytes of {name}"
    else:
        if kind == "dtype":
            e["dtype"] = rng.choice(["F8_E4M3", "F8_E5M2", "BF16", "F16", "F32", "I8", "U8", "F64", "I64", "BOOL", "Q4"])
        elif kind == "shape":
            s = e["shape"]
            op = rng.randrange(5)
            if op == 0 and s:
                s[rng.randrange(len(s))] += rng.choice([1, -1])
            elif op == 1:
                s.append(1)
            elif op == 2 and s:
                s.pop()
            elif op == 3 and len(s) > 1:
                s.reverse()
            else:
                e["shape"] = [0] + s[1:] if s else [1]
        elif kind == "offsets":
            a, z = e["data_offsets"]
            e["data_offsets"] = rng.choice([[a, z + 1], [a + 1, z + 1], [z, a], [a, len(data) + 8], [0, z - a]])
        elif kind == "drop":
            del header[name]
        elif kind == "rename":
            new = rng.choice([name.replace("weight_scale_inv", "weight_scale"), name.replace("layers.", "layers.9"),
                              name + "_", name.replace("experts.", "experts.9")])
            header[new if new != name else name + "_"] = header.pop(name)
        what = f"{kind} of {name}"
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data, what


CONFIG_EDGES = [0, -1, 1, 3, 2**31, 2**63, 1e9, 0.5, None, "x", [], {}, True]


def mutate_json(rng, cfg):
    def paths(o, prefix):
        if isinstance(o, dict):
            for k, v in o.items():
                yield from paths(v, prefix + [k])
        elif isinstance(o, list) and any(isinstance(x, dict) for x in o):
            yield prefix
            for i, x in enumerate(o):
                yield from paths(x, prefix + [i])
        else:
            yield prefix

    ps = [p for p in paths(cfg, []) if p]
    qc = [p for p in ps if "quantization_config" in p]
    p = rng.choice(qc if qc and rng.random() < 0.4 else ps)
    parent = cfg
    for k in p[:-1]:
        parent = parent[k]
    old = parent[p[-1]]
    if rng.random() < 0.15:
        del parent[p[-1]]
        return f"drop {'.'.join(map(str, p))}"
    if isinstance(old, list) and old and rng.random() < 0.6:
        parent[p[-1]] = rng.choice([old[:1], old + old[:1], [0] * len(old), [old[0], 0], [3, 5]])
    elif isinstance(old, str):
        parent[p[-1]] = rng.choice(["", "int8", "fp4", "e5m2", old.upper(), "dynamic", "static", "silu_x"])
    else:
        parent[p[-1]] = rng.choice(CONFIG_EDGES + ([old * 2, old + 1] if isinstance(old, (int, float)) and not isinstance(old, bool) else []))
    return f"{'.'.join(map(str, p))}: {old!r} -> {parent[p[-1]]!r}"


# ---------------------------------------------------------------- a repo without tokenizer.json

def split_tokenizer(model):
    """Rewrites a fixture's tokenizer.json the way Qwen's Omni and VL processor repos ship a
    tokenizer — vocab.json + merges.txt, the added tokens as tokenizer_config.json's
    `added_tokens_decoder` and as added_tokens.json — and removes tokenizer.json. False (nothing
    changed) when the tokenizer is not a BPE with merges."""
    tj = model / "tokenizer.json"
    t = json.loads(tj.read_text(encoding="utf-8"))
    m = t.get("model", {})
    if m.get("type") != "BPE" or not m.get("merges"):
        return False
    (model / "vocab.json").write_text(json.dumps(m["vocab"], ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [x if isinstance(x, str) else " ".join(x) for x in m["merges"]]
    (model / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    keys = ["content", "special", "lstrip", "rstrip", "normalized", "single_word"]
    added = t.get("added_tokens", [])
    cfg_path = model / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
    cfg["added_tokens_decoder"] = {str(a["id"]): {k: a[k] for k in keys if k in a} for a in added}
    cfg.setdefault("tokenizer_class", "Qwen2Tokenizer")
    cfg_path.write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
    (model / "added_tokens.json").write_text(json.dumps({a["content"]: a["id"] for a in added}, ensure_ascii=False), encoding="utf-8")
    tj.unlink()
    return True


def mutate_merges(rng, b):
    """One change to merges.txt's lines (bytes: a change may leave it invalid UTF-8)."""
    lines = b.split(b"\n")
    body = [i for i, l in enumerate(lines) if l and not l.startswith(b"#")]
    i = rng.choice(body)
    kind = rng.randrange(11)
    if kind == 0:
        del lines[i]
        what = f"merge line {i + 1} dropped"
    elif kind == 1:
        lines.insert(i, lines[i])
        what = f"merge line {i + 1} repeated"
    elif kind == 2:
        lines[i] = lines[i].replace(b" ", b"")
        what = f"merge line {i + 1} without its space (one token)"
    elif kind == 3:
        lines[i] += b" " + lines[i].split(b" ")[0]
        what = f"merge line {i + 1} with three tokens"
    elif kind == 4:
        lines[i] = b"qqzz wwxx"
        what = f"merge line {i + 1} of tokens the vocabulary lacks"
    elif kind == 5:
        lines[i] = lines[i][:1] + b"\xff\xfe" + lines[i][1:]
        what = f"merge line {i + 1} with bytes that are not UTF-8"
    elif kind == 6:
        return b"", "merges.txt emptied"
    elif kind == 7:
        j = rng.choice(body)
        lines[i], lines[j] = lines[j], lines[i]
        what = f"merge lines {i + 1} and {j + 1} swapped"
    elif kind == 8:
        lines[i] = lines[i].replace(b" ", rng.choice([b"\t", b"  ", b" \r"]), 1)
        what = f"merge line {i + 1} split by another separator"
    elif kind == 9:
        lines = [l for l in lines if not l.startswith(b"#")] if rng.random() < 0.5 else [b"#version: 9.9"] + lines[1:]
        what = "merges.txt header dropped or changed"
    else:
        lines[i] = lines[i] + b" " * 3 + b"x" * 70000
        what = f"merge line {i + 1} 70,000 bytes long"
    return b"\n".join(lines), what


# ---------------------------------------------------------------- running

def run(bin_path, model, args, timeout):
    cmd = [bin_path] + args
    try:
        p = subprocess.run(cmd, capture_output=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return cmd, None, b"(timed out)", b""
    return cmd, p.returncode, p.stderr, p.stdout


def finding(rc, stderr, stdout):
    if rc is None:
        return "hang"
    if rc < 0:
        return f"signal {-rc}"
    if rc == 101 or b"panicked" in stderr:
        return "panic"
    # `verify` reports on stdout and exits 1 for a damaged checkpoint; anything else must say why
    if rc != 0 and not stderr.strip() and not stdout.strip():
        return "silent failure"
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bin")
    ap.add_argument("--rounds", type=int, default=500)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="/tmp/moescope-hostile")
    ap.add_argument("--timeout", type=float, default=30)
    ap.add_argument("--vocab-files-only", action="store_true",
                    help="only the tokenizer as vocab.json + merges.txt, one of its files changed")
    ap.add_argument("--show-accepted", action="store_true",
                    help="print each mutation every command accepted (exit 0), to review by eye")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    bin_path = os.path.abspath(a.bin)
    fix = ROOT / "tests/fixtures"
    ggufs = sorted(p for p in (fix / "gguf").rglob("*.gguf"))
    dirs = [fix / "fp8/qwen3-moe-tiny-fp8", fix / "fp8/qwen3-omni-tiny-fp8", fix / "qwen3-moe-tiny"]
    dirs = [d for d in dirs if (d / "config.json").exists()]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    found, counts = 0, {}
    work = Path(tempfile.mkdtemp(prefix="hostile-"))
    for i in range(a.rounds):
        case = work / f"case{i}"
        case.mkdir()
        if rng.random() < 0.55 and not a.vocab_files_only:
            src = rng.choice(ggufs)
            if src.parent.name == "split" or "-of-" in src.name:
                # a split model: mutate one part, keep the rest beside it
                for p in src.parent.glob("*.gguf"):
                    shutil.copy(p, case / p.name)
                target = case / rng.choice(sorted(p.name for p in src.parent.glob("*.gguf")))
                model = case / sorted(p.name for p in src.parent.glob("*.gguf"))[0]
            else:
                target = model = case / src.name
            original = (src.parent / target.name).read_bytes()
            for _ in range(8):  # a mutation that changes nothing (a value set to itself) is redrawn
                mutated, what = mutate_gguf(rng, original)
                if mutated != original:
                    break
            target.write_bytes(mutated)
            label = f"{src.name}: {what}"
        else:
            src = rng.choice(dirs)
            model = case / src.name
            shutil.copytree(src, model, ignore=shutil.ignore_patterns("golden.json", ".*"))
            r = 0.0 if a.vocab_files_only else rng.random()
            if r < 0.15 and split_tokenizer(model):
                # the tokenizer as a repo without tokenizer.json ships it, one of its files changed
                name = rng.choice(["vocab.json", "merges.txt", "merges.txt", "tokenizer_config.json", "added_tokens.json"])
                if name == "merges.txt":
                    original = (model / name).read_bytes()
                    b, what = mutate_merges(rng, original)
                    (model / name).write_bytes(b)
                    what = f"(vocab files) {what}"
                else:
                    original = json.loads((model / name).read_text(encoding="utf-8"))
                    for _ in range(8):
                        doc = json.loads(json.dumps(original))
                        what = f"(vocab files) {name} {mutate_json(rng, doc)}"
                        if doc != original:
                            break
                    (model / name).write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
            elif r < 0.4:
                # config.json, or the tokenizer's two files (ids, merges, added tokens, template)
                extra = [n for n in ["model.safetensors.index.json"] if (model / n).exists()]
                name = "config.json" if r < 0.25 else rng.choice(["tokenizer.json", "tokenizer_config.json"] + extra * 2)
                original = json.loads((model / name).read_text())
                for _ in range(8):
                    doc = json.loads(json.dumps(original))
                    what = f"{name} {mutate_json(rng, doc)}"
                    if doc != original:
                        break
                (model / name).write_text(json.dumps(doc))
            else:
                shard = rng.choice(sorted(model.glob("*.safetensors")))
                original = shard.read_bytes()
                for _ in range(8):
                    b, what = mutate_safetensors(rng, original)
                    n = struct.unpack_from("<Q", b)[0]
                    m = struct.unpack_from("<Q", original)[0]
                    if (json.loads(b[8:8 + n]), b[8 + n:]) != (json.loads(original[8:8 + m]), original[8 + m:]):
                        break
                shard.write_bytes(b)
                what = f"{shard.name}: {what}"
            label = f"{src.name}: {what}"
        runs = [["generate", "--model", str(model), "--prompt", "hello there", "--max-new-tokens", "3"],
                ["generate", "--model", str(model), "--prompt", "hello there", "--max-new-tokens", "3",
                 "--backend", "selective"]]
        # Every model, GGUF files too: `verify` reads a GGUF file's block scales (§115).
        runs.append(["verify", str(model)])
        bad = None
        rcs = []
        for args in runs:
            cmd, rc, err, stdout = run(bin_path, model, args, a.timeout)
            rcs.append(rc)
            counts[rc] = counts.get(rc, 0) + 1
            f = finding(rc, err, stdout)
            if f:
                bad = (f, cmd, rc, err)
                break
        if not bad and a.show_accepted and all(r == 0 for r in rcs):
            print(f"[{i}] accepted: {label}", flush=True)
            shutil.copytree(case, out / f"accepted{i}", dirs_exist_ok=True)
            (out / f"accepted{i}" / "what.txt").write_text(label + "\n")
        if bad:
            found += 1
            dest = out / f"finding{found}"
            shutil.copytree(case, dest, dirs_exist_ok=True)
            (dest / "what.txt").write_text(f"{bad[0]}: {label}\n{' '.join(bad[1])}\nrc={bad[2]}\n{bad[3].decode(errors='replace')}")
            print(f"[{i}] FINDING {bad[0]}: {label}\n    {bad[3].decode(errors='replace').strip()[-400:]}", flush=True)
        shutil.rmtree(case)
    shutil.rmtree(work)
    print(f"{a.rounds} mutated inputs, {sum(counts.values())} runs, exit codes {dict(sorted(counts.items(), key=str))}, {found} findings")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
