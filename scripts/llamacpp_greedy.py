#!/usr/bin/env python3
"""moescope's greedy continuations against llama.cpp's on the same GGUF files (issue 20's "the
first 32 greedy tokens"; BENCHMARKS.md §89). A benchmark, not a test.

    python3 scripts/llamacpp_greedy.py [--bin target/release/moescope] [--prompts prompts/study.toml]
        [--new 32] [--dtype f32] FILE.gguf …

Every prompt of the set goes through moescope's `generate` (its chat template, greedy, ending at
the end-of-generation token); the same prompt token ids then go to llama.cpp
(scripts/llamacpp_greedy.cpp, built here against the libllama that scripts/llamacpp_compare.sh
builds) with its defaults, with flash attention off, and off with an f32 KV cache (the arithmetic
closest to moescope's f32 attention) — how far llama.cpp is from itself. Then the file's *exact
weights*: `llama-quantize … F32` widens every block to f32 (exactly), and llama.cpp runs that file
in f32 throughout (flash attention off, f32 KV cache) — the model the file holds, with no 8-bit
rounding of activations. Each continuation is compared with llama.cpp's defaults and with the
exact weights': how many prompts give the same continuation, and how many leading tokens agree in
all (continuations that end at the same end token count as equal).

llama.cpp's source: the llama-cpp-python sdist that scripts/make_gguf_fixtures.sh unpacks into
${TMPDIR:-/tmp}/moescope-llamacpp (its build-noamx directory, from llamacpp_compare.sh).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

# llama.cpp's runs of the file itself: name -> the driver's settings.
LLAMA = {
    "llama.cpp defaults": [],
    "llama.cpp fa=off": ["fa=off"],
    "llama.cpp fa=off kv=f32": ["fa=off", "kv=f32"],
}
EXACT = "exact weights (f32 file)"


def build_driver(work: Path) -> Path:
    exe = work / "greedy" / "llamacpp_greedy"
    src = Path(__file__).with_name("llamacpp_greedy.cpp")
    if exe.exists() and exe.stat().st_mtime >= src.stat().st_mtime:
        return exe
    lib = work / "build-noamx" / "bin"
    if not (lib / "libllama.so").exists():
        sys.exit(f"{lib}/libllama.so is missing: run scripts/llamacpp_compare.sh first (it builds llama.cpp)")
    exe.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["g++", "-O2", "-std=c++17", f"-I{work}/src/include", f"-I{work}/src/ggml/include",
         str(src), f"-L{lib}", "-lllama", "-lggml", "-lggml-base", f"-Wl,-rpath,{lib}",
         "-o", str(exe)],
        check=True,
    )
    return exe


def agree(a: list[int], b: list[int]) -> int:
    """Leading tokens the two continuations share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def llama(driver: Path, model: str, new: int, ids: list[int], settings: list[str]) -> list[int]:
    out = subprocess.run(
        [str(driver), model, str(new), ",".join(map(str, ids)), *settings],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    return [int(t) for t in out.split(",") if t]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--bin", default="target/release/moescope")
    ap.add_argument("--prompts", default="prompts/study.toml")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--dtype", default="f32")
    args = ap.parse_args()
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "moescope-llamacpp"
    driver = build_driver(work)
    quantize = work / "build-noamx" / "bin" / "llama-quantize"
    prompts = tomllib.loads(Path(args.prompts).read_text())["prompt"]

    for f in args.files:
        with tempfile.TemporaryDirectory() as tmp:
            exact_file = f"{tmp}/exact-f32.gguf"
            subprocess.run([str(quantize), "--allow-requantize", f, exact_file, "F32"],
                           check=True, capture_output=True)
            runs: dict[str, list[list[int]]] = {}
            for p in prompts:
                got = json.loads(subprocess.run(
                    [args.bin, "generate", "--model", f, "--dtype", args.dtype, "--prompt",
                     p["text"], "--max-new-tokens", str(args.new), "--json"],
                    check=True, capture_output=True, text=True,
                ).stdout)
                ids = got["prompt_token_ids"]
                runs.setdefault(f"moescope {args.dtype}", []).append(got["generated_token_ids"])
                for name, settings in LLAMA.items():
                    runs.setdefault(name, []).append(llama(driver, f, args.new, ids, settings))
                runs.setdefault(EXACT, []).append(
                    llama(driver, exact_file, args.new, ids, ["fa=off", "kv=f32"]))
        print(f"{Path(f).name}, {len(prompts)} prompts of {args.prompts}, up to {args.new} greedy tokens:")
        for against in ("llama.cpp defaults", EXACT):
            for name, conts in runs.items():
                if name == against:
                    continue
                refs = runs[against]
                equal = sum(a == b for a, b in zip(conts, refs))
                agreed = sum(agree(a, b) for a, b in zip(conts, refs))
                of = sum(max(len(a), len(b)) for a, b in zip(conts, refs))
                print(f"  {name:26} against {against:26} {equal:3}/{len(prompts)} equal, "
                      f"{agreed}/{of} leading tokens agree")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
