"""The `jaxinfer` command line.

    jaxinfer generate "prompt" [--model PATH] [--max-tokens N] [--temperature T] ...
    jaxinfer convert --model SRC --output DIR [--dtype bfloat16]

Only generated text goes to stdout; logs and progress bars go to stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys

from jaxinfer.errors import JaxinferError

log = logging.getLogger("jaxinfer")


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="GGUF file, HF checkpoint directory or jaxinfer checkpoint "
                        "(default: SmolLM2-135M-Instruct, downloaded once)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="compute dtype (default: float32 on CPU, bfloat16 on GPU/TPU)")
    p.add_argument("--tensor-parallel", "--tp", type=int, default=1, metavar="N",
                   help="split the model over N devices")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxinfer", description="JAX/XLA LLM inference engine")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a continuation, streamed to stdout")
    gen.add_argument("prompt", nargs="+", help="prompt text (several prompts run as one batch)")
    _model_flags(gen)
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    gen.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-generation tokens")
    gen.add_argument("--page-size", type=int, default=16, help="KV cache page size in tokens")

    conv = sub.add_parser("convert", help="convert a checkpoint to jaxinfer's Orbax format")
    _model_flags(conv)
    conv.add_argument("--output", required=True, help="new directory for the converted checkpoint")
    return parser


def cmd_generate(args) -> int:
    from jaxinfer.sampling import SamplingParams
    from jaxinfer.text_generation import TextGenerator

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                            ignore_eos=args.ignore_eos)
    if any(not p.strip() for p in args.prompt):
        raise JaxinferError("the prompt is empty")
    tg = TextGenerator.load(args.model, dtype=args.dtype, tensor_parallel=args.tensor_parallel,
                            page_size=args.page_size)
    prompts = [tg.encode_prompt(p, chat=args.chat) for p in args.prompt]
    eos = tg.eos_token_ids()

    if len(prompts) == 1:
        stream = tg.tokenizer.stream_decoder(skip_special_tokens=True)

        def on_token(row, token):
            if token in eos and not args.ignore_eos:
                return
            sys.stdout.write(stream.push(token))
            sys.stdout.flush()

        results = tg.generate_ids(prompts, params, on_token)
        sys.stdout.write(stream.flush() + "\n")
    else:
        results = tg.generate_ids(prompts, params)
        for r in results:
            ids = r.token_ids[:-1] if r.finish_reason == "stop" else r.token_ids
            sys.stdout.write(tg.tokenizer.decode(ids, skip_special_tokens=True) + "\n")
    sys.stdout.flush()
    n_out = sum(len(r.token_ids) for r in results)
    decode_s = max(r.decode_seconds for r in results)
    log.info("%d prompt tokens in %.2fs; %d generated tokens in %.2fs (%.1f tok/s); finish: %s",
             sum(len(p) for p in prompts), results[0].prefill_seconds, n_out, decode_s,
             n_out / max(decode_s, 1e-9), ", ".join(r.finish_reason for r in results))
    return 0


def cmd_convert(args) -> int:
    from checkpoints import orbax_io
    from jaxinfer.text_generation import TextGenerator

    tg = TextGenerator.load(args.model, dtype=args.dtype, tensor_parallel=args.tensor_parallel)
    orbax_io.save(args.output, tg.config, tg.model.state, tg.tokenizer)
    log.info("saved %s to %s", tg.model.source, args.output)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return {"generate": cmd_generate, "convert": cmd_convert}[args.command](args)
    except JaxinferError as e:
        print(f"jaxinfer: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("jaxinfer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
