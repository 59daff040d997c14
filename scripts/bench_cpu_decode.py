"""CPU decode on the default model beside llama.cpp (issue 12), in one run: greedy, batch 1, 128 tokens.

    python scripts/bench_cpu_decode.py --llama-site /tmp/llamaenv            # llama.cpp, gguf, float; 5 repeats
    python scripts/bench_cpu_decode.py --no-llama --engines gguf --repeats 3  # jaxinfer alone

Engines (each loaded once, then the repeats go round them in turn, so a noisy spell of a shared machine
lands on all of them alike):
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
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "The history of the printing press begins"


def llama_cpp_engine(path: str, site: str | None, threads: int, tokens: int):
    if site:
        sys.path.insert(0, site)
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

    llm = LLM(path, quantization=quantization, progress=False)
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
    args = ap.parse_args()

    from checkpoints.default_model import default_model_path

    path = str(default_model_path())
    engines = [e for e in args.engines if not (args.no_llama and e == "llama.cpp")]
    runs = {}
    for name in engines:
        started = time.perf_counter()
        if name == "llama.cpp":
            label, run = llama_cpp_engine(path, args.llama_site, args.threads, args.tokens)
        else:
            label, run = jaxinfer_engine(path, "gguf" if name == "gguf" else None, args.tokens)
        run()  # warm-up
        print(f"{label}: loaded and warmed up in {time.perf_counter() - started:.1f} s", flush=True)
        runs[label] = run
    tpots = {label: [] for label in runs}
    texts = {}
    for i in range(args.repeats):
        for label, run in runs.items():
            tpot, texts[label] = run()
            tpots[label].append(tpot)
            print(f"repeat {i + 1}: {label:<22} {1 / tpot:6.1f} tok/s", flush=True)

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
