"""CPU decode on the default model beside llama.cpp (issue 12), in one run: greedy, batch 1, 128 tokens.

    python scripts/bench_cpu_decode.py --llama-site /tmp/llamaenv            # llama.cpp, gguf, float; 5 repeats
    python scripts/bench_cpu_decode.py --no-llama --engines gguf --repeats 3  # jaxinfer alone

Engines, each in its own child process, one after the other (in one process, XLA's idle thread pool and the
engine's threads took the cores from llama.cpp's spinning threads: 0.5 to 12 tok/s instead of ~90):
  llama.cpp  llama-cpp-python on the same GGUF file, n_threads=2 (--threads). It is imported from
             --llama-site (a folder from `pip install --target`), never from jaxinfer's environment.
             Sampling is greedy; its generator does not stop at EOS.
  gguf       `LLM(quantization="gguf")`: the file's Q4_1 projections kept as int4-g32-zp and multiplied by the
             native CPU kernel (pallas_kernels/quantized_matmul/cpu.py).
  float      `LLM()`: the GGUF dequantized to float32 on load.

Each timed run decodes 128 tokens (--tokens) after an untimed warm-up run. TPOT is the time from the first
output token to the last over the tokens between, as jaxinfer's `RequestOutput.time_per_output_token`
(llama.cpp: the same two instants, from its token generator), so prefill is left out of both. tok/s is
1 / TPOT; the table gives the median and best over the repeats, and each engine's ratio to llama.cpp's
median.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "The history of the printing press begins"


def llama_cpp_engine(path: str, site: str | None, threads: int, tokens: int):
    if site:
        sys.path.append(site)  # after jaxinfer's own packages: its numpy must not shadow ours
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False)
    prompt = llm.tokenize(PROMPT.encode())

    def run() -> tuple[float, str]:
        # generate() yields token after token and never stops at EOS itself; temp 0 is greedy.
        out, first, last = [], None, None
        for tok in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            last = time.perf_counter()
            first = first or last
            out.append(tok)
            if len(out) == tokens:
                break
        return (last - first) / (len(out) - 1), llm.detokenize(out).decode(errors="replace")

    return f"llama.cpp {llama_cpp.__version__}", run


def jaxinfer_engine(path: str, quantization: str | None, tokens: int):
    from jaxinfer import LLM, SamplingParams

    # Every shape made before the timing starts: a background warm-up would compete for the two cores.
    llm = LLM(path, quantization=quantization, progress=False, warmup_in_background=False)
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)

    def run() -> tuple[float, str]:
        out = llm.generate([PROMPT], params, use_tqdm=False)[0]
        return out.time_per_output_token, out.outputs[0].text

    return f"jaxinfer {quantization or 'float32'}", run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", nargs="+", default=["llama.cpp", "gguf", "float"],
                    choices=["llama.cpp", "gguf", "float"])
    ap.add_argument("--no-llama", action="store_true", help="leave llama.cpp out")
    ap.add_argument("--llama-site", help="folder holding llama_cpp (pip install --target ...)")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp's threads")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()

    from checkpoints.default_model import default_model_path

    path = str(default_model_path())
    if args.child:
        if args.child == "llama.cpp":
            label, run = llama_cpp_engine(path, args.llama_site, args.threads, args.tokens)
        else:
            label, run = jaxinfer_engine(path, "gguf" if args.child == "gguf" else None, args.tokens)
        run()  # warm-up
        results = [run() for _ in range(args.repeats)]
        print("RESULT " + json.dumps({"label": label, "tpots": [t for t, _ in results], "text": results[-1][1]}))
        return
    engines = [e for e in args.engines if not (args.no_llama and e == "llama.cpp")]
    tpots, texts = {}, {}
    for name in engines:
        cmd = [sys.executable, __file__, "--child", name, "--tokens", str(args.tokens), "--repeats", str(args.repeats),
               "--threads", str(args.threads)] + (["--llama-site", args.llama_site] if args.llama_site else [])
        done = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
        got = json.loads(line[len("RESULT "):])
        tpots[got["label"]], texts[got["label"]] = got["tpots"], got["text"]
        print(f"{got['label']}: " + ", ".join(f"{1 / t:.1f}" for t in got["tpots"]) + " tok/s", flush=True)

    peer = next((statistics.median(t) for label, t in tpots.items() if label.startswith("llama.cpp")), None)
    print(f"\n`python scripts/bench_cpu_decode.py {' '.join(sys.argv[1:])}`: {path.rsplit('/', 1)[-1]}, greedy, "
          f"batch 1, {args.tokens} tokens after a warm-up, {args.repeats} repeats\n")
    print("| engine | median tok/s | best tok/s | median TPOT ms | × llama.cpp (median) |")
    print("|---|---:|---:|---:|---:|")
    for label, t in tpots.items():
        med = statistics.median(t)
        ratio = f"{peer / med:.2f}" if peer else ""
        print(f"| {label} | {1 / med:.1f} | {1 / min(t):.1f} | {med * 1e3:.2f} | {ratio} |")
    print()
    for label, text in texts.items():
        print(f"{label}: {text[:80]!r}")


if __name__ == "__main__":
    main()
