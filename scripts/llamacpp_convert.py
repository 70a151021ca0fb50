#!/usr/bin/env python3
"""llama.cpp's convert_hf_to_gguf.py on one of our models, told our tokenizers' pre-tokenizer.

  PYTHONPATH=SRC/gguf-py:SRC python3 scripts/llamacpp_convert.py SRC OUTTYPE OUTFILE MODEL_DIR

SRC: llama.cpp's source (vendored in the llama-cpp-python sdist, which
scripts/make_gguf_fixtures.sh fetches). Our tokenizers split text as Qwen2's do, but their
vocabularies are our own, so the converter does not know their pre-tokenizer hash: this tells it
"qwen2" (see models/tiny-moe/README.md). Used by scripts/make_gguf_fixtures.sh and
scripts/llamacpp_rope.sh.
"""
import runpy
import sys

src, outtype, out, model = sys.argv[1:]
sys.path.insert(0, src)
import conversion.base as base  # noqa: E402  (from SRC, on the path just above)

base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv = ["convert_hf_to_gguf.py", model, "--outtype", outtype, "--outfile", out]
runpy.run_path(f"{src}/convert_hf_to_gguf.py", run_name="__main__")
