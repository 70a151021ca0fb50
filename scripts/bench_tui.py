#!/usr/bin/env python3
"""Decode speed with the live dashboard vs `--no-tui`: same binary, same machine, same model and
prompts, runs alternated so drift hits both alike. The dashboard runs in a real terminal (a
detached tmux session of the given size); it is quit with `q` once every prompt is done.

    scripts/bench_tui.py [--bin target/release/moescope] [--rounds 3] [--size 160x50] -- RUN ARGS

RUN ARGS go to `moescope run` (e.g. `--prompts prompts/long.toml --max-new-tokens 128`).
Prints one line per run and the ratio of mean decode tok/s (TUI / no TUI) per backend; `--json`
prints the same as JSON. Needs tmux.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def decode_rates(bin_path, recording):
    """Mean decode tok/s per backend over all prompts (tokens over time, not a mean of rates)."""
    out = subprocess.run(
        [bin_path, "export", recording, "--format", "json"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    doc = json.loads(out)
    rates = {}
    for name, b in doc["backends"].items():
        toks, secs = 0, 0.0
        for p in b["prompts"]:
            r = p.get("decode_tok_s")
            n = p.get("generated_tokens", 0) - 1
            if r and n > 0:
                toks += n
                secs += n / r
        rates[name] = toks / secs if secs > 0 else None
    return rates


class Follower:
    """Counts event types in a recording that is still being written, reading only what is new
    (re-reading the whole file several times a second would cost CPU in the TUI runs only and
    show up as dashboard overhead)."""

    def __init__(self, path):
        self.path, self.offset, self.partial, self.counts = path, 0, b"", {}

    def poll(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            for kind in (b"prompt_done", b"finished"):
                if b'"type":"' + kind + b'"' in line:
                    self.counts[kind.decode()] = self.counts.get(kind.decode(), 0) + 1

    def count(self, kind):
        return self.counts.get(kind, 0)


def prompts_in(recording):
    """Prompt count from the recording's header line (0 until it is written)."""
    try:
        with open(recording, encoding="utf-8") as f:
            header = json.loads(f.readline())
        return len(header.get("prompts", {}).get("prompt", [])) or len(header.get("prompts", []))
    except (FileNotFoundError, json.JSONDecodeError, AttributeError, TypeError):
        return 0


def run_tui(bin_path, args, recording, size, timeout):
    w, h = size.split("x")
    session = f"moescope-bench-{os.getpid()}"
    cmd = " ".join([bin_path, "run", "--record", recording, *args])
    subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", session, "-x", w, "-y", h,
         f"TERM=xterm-256color {cmd}; sleep 2"],
        check=True,
    )
    start = time.time()
    follow = Follower(recording)
    try:
        n = 0
        while True:
            n = n or prompts_in(recording)
            follow.poll()
            if n and follow.count("prompt_done") >= 2 * n:
                break
            if time.time() - start > timeout:
                raise SystemExit(f"dashboard run did not finish in {timeout} s ({recording})")
            time.sleep(0.2)
        time.sleep(0.5)
        subprocess.run(["tmux", "send-keys", "-t", session, "q"], check=True)
        while follow.count("finished") == 0 and time.time() - start < timeout:
            time.sleep(0.1)
            follow.poll()
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def run_plain(bin_path, args, recording):
    subprocess.run(
        [bin_path, "run", "--no-tui", "--record", recording, *args],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", default="target/release/moescope")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", default="160x50")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("run_args", nargs="*")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="moescope-tui-bench-")
    rows = []
    for i in range(a.rounds):
        # ABBA order: whichever mode runs first in a round is not always the same one, so a
        # systematic first/second-run effect cannot pass for a dashboard effect.
        for mode in (("tui", "no-tui") if i % 2 == 0 else ("no-tui", "tui")):
            rec = os.path.join(tmp, f"{mode}-{i}.ndjson")
            if mode == "tui":
                run_tui(a.bin, a.run_args, rec, a.size, a.timeout)
            else:
                run_plain(a.bin, a.run_args, rec)
            r = decode_rates(a.bin, rec)
            rows.append({"round": i, "mode": mode, **r})
            if not a.json:
                print(f"round {i} {mode:6}: " + "  ".join(
                    f"{k} {v:.1f} tok/s" for k, v in r.items() if v), flush=True)
    summary = {}
    for backend in ("native", "selective"):
        mean = {}
        for mode in ("tui", "no-tui"):
            vals = [r[backend] for r in rows if r["mode"] == mode and r.get(backend)]
            mean[mode] = sum(vals) / len(vals) if vals else None
        if mean["tui"] and mean["no-tui"]:
            summary[backend] = {**mean, "ratio": mean["tui"] / mean["no-tui"]}
    if a.json:
        print(json.dumps({"runs": rows, "summary": summary}, indent=1))
    else:
        for k, v in summary.items():
            print(f"{k}: TUI {v['tui']:.1f} tok/s, no TUI {v['no-tui']:.1f} tok/s, "
                  f"ratio {v['ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
