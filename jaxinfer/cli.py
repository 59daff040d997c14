"""The `jaxinfer` command line.

    jaxinfer generate "prompt" [--model PATH] [--max-tokens N] [--temperature T] ...
    jaxinfer convert --model SRC --output DIR [--dtype bfloat16]
    jaxinfer batch --input prompts.jsonl --output results.jsonl [--model PATH] [--max-tokens N] ...
    jaxinfer serve [--model PATH] [--host 127.0.0.1] [--port 50051] [--token-file FILE] [--tls-cert ...]
    jaxinfer client "prompt" [--host H] [--port P] [--token-file FILE] [--max-tokens N] ...

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
    p.add_argument("--quantization", "-q", default=None, metavar="METHOD",
                   help="quantize the projections as the model loads: int8, int4 (groups of 128, or "
                        "64/32 where 128 does not fit), fp8, or int8-ch, int4-g64, int4-g32-zp, ...; "
                        "gguf: a GGUF's own Q8_0/Q4_0/Q4_1 weights kept (default: the checkpoint's own "
                        "weights, dequantized)")
    p.add_argument("--tensor-parallel", "--tp", type=int, default=1, metavar="N",
                   help="split the model over N devices")
    p.add_argument("--data-parallel-size", "--dp", type=int, default=1, metavar="N",
                   help="N independent replicas (each over --tp devices), requests routed by load and shared prefix")
    g = p.add_argument_group("multi-process runs (one process per host or GPU; also from JAX_COORDINATOR_ADDRESS, "
                             "JAX_NUM_PROCESSES, JAX_PROCESS_ID; found by JAX on TPU pods)")
    g.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                   help="process 0's address for jax.distributed; every process gives the same")
    g.add_argument("--num-processes", type=int, default=None, metavar="N", help="processes in the run")
    g.add_argument("--process-id", type=int, default=None, metavar="I",
                   help="this process (0 serves and writes outputs; the others follow its steps)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxinfer", description="JAX/XLA LLM inference engine")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a continuation, streamed to stdout")
    gen.add_argument("prompt", nargs="+", help="prompt text (several prompts run as one batch)")
    _model_flags(gen)
    _sampling_flags(gen)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    _engine_flags(gen)

    conv = sub.add_parser("convert", help="convert a checkpoint to jaxinfer's Orbax format")
    _model_flags(conv)
    conv.add_argument("--output", required=True, help="new directory for the converted checkpoint")
    batch = sub.add_parser("batch", help="answer a JSONL file of requests into a JSONL file of results; "
                                         "re-running resumes")
    batch.add_argument("--input", required=True, help="JSONL requests: id, prompt/messages/token_ids, "
                                                      "optional priority and sampling fields")
    batch.add_argument("--output", required=True, help="JSONL results, appended as requests finish")
    _model_flags(batch)
    _batch_sampling_flags(batch)
    _engine_flags(batch)

    serve = sub.add_parser("serve", help="serve the model over gRPC (jaxinfer.v1.Inference)",
                           description="Serve the model over gRPC until SIGTERM/SIGINT, then drain: refuse "
                                       "new streams, finish the running ones, exit 0. The bearer token comes "
                                       f"from --token-file or ${TOKEN_ENV}, never from a flag value.")
    _model_flags(serve)
    _engine_flags(serve)
    _serve_flags(serve)

    client = sub.add_parser("client", help="send one prompt to a running server; the reply streams to stdout")
    client.add_argument("prompt", help="prompt text")
    client.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    _connection_flags(client)
    _sampling_flags(client)
    return parser


def _sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when this text appears (repeatable)")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-generation tokens")


TOKEN_ENV = "JAXINFER_TOKEN"


_LIMITS = ("max_concurrent_streams", "max_queued_requests", "max_prompt_tokens", "max_total_tokens",
           "max_message_bytes")


def _serve_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 exposes the "
                        "server to the network: set a token and TLS)")
    g.add_argument("--port", type=int, default=50051, help="gRPC port (0: any free port, logged)")
    g.add_argument("--metrics-port", type=int, default=None, metavar="N",
                   help="serve Prometheus metrics over HTTP on this port (default: off)")
    g.add_argument("--drain-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT, how long running streams may take to finish")
    g.add_argument("--log-format", choices=["json", "text"], default="json", help="log lines on stderr")
    g = p.add_argument_group("limits (default: serving.server.Limits; the effective ones are logged)")
    g.add_argument("--max-concurrent-streams", type=int, default=None, metavar="N")
    g.add_argument("--max-queued-requests", type=int, default=None, metavar="N")
    g.add_argument("--max-prompt-tokens", type=int, default=None, metavar="N",
                   help="default: the context length - 1")
    g.add_argument("--max-total-tokens", type=int, default=None, metavar="N",
                   help="prompt + max_tokens; default: the context length")
    g.add_argument("--max-message-bytes", type=int, default=None, metavar="N")
    g = p.add_argument_group("security")
    g.add_argument("--token-file", default=None, metavar="FILE",
                   help=f"bearer tokens clients must send, one per line, each its own client identity "
                        f"(default: ${TOKEN_ENV} if set, else none)")
    g.add_argument("--tls-cert", default=None, metavar="PEM", help="TLS certificate chain (with --tls-key)")
    g.add_argument("--tls-key", default=None, metavar="PEM", help="TLS private key")
    g.add_argument("--tls-client-ca", default=None, metavar="PEM",
                   help="mutual TLS: clients need a certificate signed by this CA")


def _connection_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=50051)
    g.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="deadline of the request")
    g.add_argument("--token-file", default=None, metavar="FILE",
                   help=f"bearer token to send (default: ${TOKEN_ENV} if set, else none)")
    g.add_argument("--tls-ca", default=None, metavar="PEM", help="use TLS; the CA of the server's certificate")
    g.add_argument("--tls-cert", default=None, metavar="PEM", help="mutual TLS: client certificate")
    g.add_argument("--tls-key", default=None, metavar="PEM", help="mutual TLS: client private key")


def _read_tokens(token_file: str | None) -> tuple[str, ...]:
    """Bearer tokens: one per line of `token_file` (blank lines and # comments skipped), else
    $JAXINFER_TOKEN, else none. Never logged."""
    import os

    from jaxinfer.errors import ConfigError

    if token_file is None:
        token = os.environ.get(TOKEN_ENV)
        if token is not None and not token.strip():
            raise ConfigError(f"${TOKEN_ENV} is set but empty")
        return (token.strip(),) if token else ()
    try:
        with open(token_file, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the token file {token_file!r}: {getattr(e, 'strerror', None) or e}") \
            from None
    tokens = tuple(t for t in lines if t and not t.startswith("#"))
    if not tokens:
        raise ConfigError(f"the token file {token_file!r} holds no token")
    if any(any(c.isspace() for c in t) for t in tokens):
        raise ConfigError(f"the token file {token_file!r} has a line with spaces inside: one token per line")
    return tokens


def _read_token(token_file: str | None) -> str | None:
    """The one bearer token a client sends (see `_read_tokens`)."""
    from jaxinfer.errors import ConfigError

    tokens = _read_tokens(token_file)
    if len(tokens) > 1:
        raise ConfigError(f"the token file {token_file!r} holds {len(tokens)} tokens; a client sends one")
    return tokens[0] if tokens else None


def _sampling_params(args):
    from jaxinfer.core.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, seed=args.seed, stop=args.stop,
                          repetition_penalty=args.repetition_penalty,
                          presence_penalty=args.presence_penalty,
                          frequency_penalty=args.frequency_penalty, ignore_eos=args.ignore_eos)


def _engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--page-size", type=int, default=16, help="KV cache page size in tokens")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences running at once")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens per engine step")
    p.add_argument("--max-model-len", type=int, default=None, help="longest prompt + output")
    p.add_argument("--num-pages", type=int, default=None, help="KV cache pages (default: sized from memory)")
    p.add_argument("--no-prefix-caching", action="store_true", help="turn off automatic prefix caching")
    p.add_argument("--stream-interval", type=int, default=1, metavar="N",
                   help="stream every N new tokens (the first and the last always go out at once)")
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='speculative decoding, vLLM\'s keys, e.g. \'{"method": "ngram", '
                        '"num_speculative_tokens": 3, "prompt_lookup_max": 4}\', \'{"model": "draft.gguf", '
                        '"num_speculative_tokens": 4}\' or \'{"method": "eagle3", "model": "HEAD_DIR"}\' '
                        '(scripts/train_draft_head.py)')
    p.add_argument("--attention", choices=["auto", "kernels", "xla", "reference"], default=None,
                   help="attention implementation (default auto: Pallas kernels on GPU/TPU, plain "
                        "JAX on CPU; reference forces the pure-JAX reference)")


def _json_object(flag: str, text: str | None) -> dict | None:
    import json

    from jaxinfer.errors import ConfigError

    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{flag} is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{flag} must be a JSON object, got {type(value).__name__}")
    return value


def _load_llm(args, warmup: bool, progress: bool = True):
    """The command's LLM. On a follower process of a multi-process run this never returns: the
    process makes the leader's device calls until the leader closes, then exits."""
    from jaxinfer import distributed

    distributed.initialize(getattr(args, "coordinator_address", None), getattr(args, "num_processes", None),
                           getattr(args, "process_id", None))
    llm = _new_llm(args, warmup, progress)
    _opened.append(llm)  # closed when the command ends: in a multi-process run, that lets the followers go
    if not llm.is_leader:
        if args.command == "serve":
            llm.engine.warmup(background=True)  # as the leader's server does
        log.info("following process 0's steps")
        llm.follow()
        log.info("process 0 closed its engine; exiting")
        sys.exit(0)
    return llm


_opened: list = []


def _new_llm(args, warmup: bool, progress: bool):
    from jaxinfer.llm import LLM

    return LLM(args.model, dtype=args.dtype, quantization=args.quantization,
               tensor_parallel_size=args.tensor_parallel, data_parallel_size=args.data_parallel_size,
               warmup=warmup,
               progress=progress,
               page_size=args.page_size, max_num_seqs=args.max_num_seqs,
               max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
               num_pages=args.num_pages, enable_prefix_caching=not args.no_prefix_caching,
               attention=args.attention, stream_interval=args.stream_interval,
               speculative_config=_json_object("--speculative-config", args.speculative_config))


def cmd_generate(args) -> int:
    params = _sampling_params(args)
    if any(not p.strip() for p in args.prompt):
        raise JaxinferError("the prompt is empty")
    # One prompt is interactive: compile shapes as they come rather than all up front.
    llm = _load_llm(args, warmup=len(args.prompt) > 1)
    prompts = [{"messages": [{"role": "user", "content": p}]} if args.chat else p for p in args.prompt]
    if len(prompts) == 1:
        shown = 0
        for out in llm.stream(prompts[0], params):
            text = out.outputs[0].text
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
            shown = len(text)
        sys.stdout.write("\n")
        results = [out]
    else:
        results = llm.generate(prompts, params, use_tqdm=True)
        for r in results:
            sys.stdout.write(r.outputs[0].text + "\n")
    sys.stdout.flush()
    for r in results:
        m = r.metrics
        n_out = len(r.outputs[0].token_ids)
        tpot = r.time_per_output_token
        log.info("%d prompt tokens, %d generated tokens; time to first token %.2fs, %s per token "
                 "(%s tok/s); finish: %s", len(r.prompt_token_ids), n_out,
                 m.time_to_first_token or 0.0, f"{tpot * 1e3:.1f} ms" if tpot else "-",
                 f"{1 / tpot:.1f}" if tpot else "-", r.outputs[0].finish_reason)
    return 0


# Batch sampling flags are defaults under each line's own fields; a flag not given leaves
# SamplingParams' default (so no argparse defaults here): (flag, field, type).
_BATCH_SAMPLING = [("--max-tokens", "max_tokens", int), ("--min-tokens", "min_tokens", int),
                   ("--temperature", "temperature", float), ("--top-k", "top_k", int),
                   ("--top-p", "top_p", float), ("--min-p", "min_p", float), ("--seed", "seed", int),
                   ("--n", "n", int), ("--logprobs", "logprobs", int),
                   ("--prompt-logprobs", "prompt_logprobs", int),
                   ("--repetition-penalty", "repetition_penalty", float),
                   ("--presence-penalty", "presence_penalty", float),
                   ("--frequency-penalty", "frequency_penalty", float)]


def _batch_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling defaults (a line's own fields override them)")
    for flag, field, kind in _BATCH_SAMPLING:
        g.add_argument(flag, dest=field, type=kind, default=argparse.SUPPRESS)
    g.add_argument("--stop", dest="stop", action="append", default=argparse.SUPPRESS, metavar="TEXT",
                   help="stop when this text appears (repeatable)")
    g.add_argument("--ignore-eos", dest="ignore_eos", action="store_true", default=argparse.SUPPRESS,
                   help="do not stop at end-of-generation tokens")


def _batch_defaults(args) -> dict:
    """The sampling flags given on the command line, as SamplingParams fields."""
    fields = [field for _, field, _ in _BATCH_SAMPLING] + ["stop", "ignore_eos"]
    return {f: getattr(args, f) for f in fields if hasattr(args, f)}


def cmd_batch(args) -> int:
    from jaxinfer.batch_job import check_paths, run_batch
    from jaxinfer.core.sampling_params import SamplingParams

    defaults = _batch_defaults(args)
    SamplingParams.from_dict(defaults)  # bad flags fail before the model loads
    check_paths(args.input, args.output)
    llm = _load_llm(args, warmup=True)
    summary = run_batch(llm, args.input, args.output, defaults, progress=True)
    print(f"jaxinfer batch: {summary.describe()}", file=sys.stderr)
    if summary.interrupted:
        return 143 if summary.interrupted == "SIGTERM" else 130
    return 0


def cmd_serve(args) -> int:
    import dataclasses
    import signal
    import time

    from jaxinfer.errors import ConfigError
    from serving.server import Limits, Security, Server

    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")
    security = Security(tokens=_read_tokens(args.token_file), cert_file=args.tls_cert, key_file=args.tls_key,
                        client_ca_file=args.tls_client_ca)
    if security.cert_file:  # fail on unusable PEM files before the model loads
        from serving.security import server_credentials
        server_credentials(security.cert_file, security.key_file, security.client_ca_file)
    limits = Limits(**{k: getattr(args, k) for k in _LIMITS if getattr(args, k) is not None})
    if args.host not in ("127.0.0.1", "localhost", "::1") and not (security.tokens and security.cert_file):
        log.warning("listening on %s without both a bearer token and TLS: anyone who can reach this port "
                    "can use the model", args.host)

    # The server warms up after it starts listening; its stderr holds JSON lines only, so no bars.
    llm = _load_llm(args, warmup=False, progress=False)
    server = Server(llm.engine, host=args.host, port=args.port, limits=limits, security=security,
                    metrics_port=args.metrics_port, warmup=True)
    stop: list[int] = []  # the signals received

    def on_signal(signum, frame):
        # No lock here (not even Event.set): the handler runs on the main thread, which may be
        # holding that very lock inside a wait, and would then wait for itself forever.
        stop.append(signum)
        # A second Ctrl-C stops waiting for the drain.
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        port = server.start()
    except RuntimeError as e:  # grpc cannot bind the address
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {e}") from None
    log.info("serving %s on %s:%d (gRPC%s%s)", llm.model.source, args.host, port,
             ", TLS" if security.cert_file else "", f", {len(security.tokens)} bearer token(s)" if security.tokens else "",
             extra={"limits": dataclasses.asdict(limits)})
    announced = False
    while not stop:
        time.sleep(0.2)
        if server.stopped.is_set():
            print("jaxinfer: error: the server stopped unexpectedly", file=sys.stderr)
            return 1
        if not announced and server.ready.is_set():
            log.info("ready on %s:%d", args.host, port)
            announced = True
    log.info("draining (up to %.0fs)", args.drain_timeout)
    server.drain(timeout=args.drain_timeout)
    if server._thread is not None:  # let asyncio.run finish its clean-up before the interpreter exits
        server._thread.join(30)
    log.info("stopped")
    return 0


def cmd_client(args) -> int:
    import grpc

    from serving.client import Client
    from serving.gen.jaxinfer.v1 import inference_pb2 as pb

    if not args.prompt.strip():
        raise JaxinferError("the prompt is empty")
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, min_p=args.min_p, seed=args.seed, stop=args.stop,
                    repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                    frequency_penalty=args.frequency_penalty, ignore_eos=args.ignore_eos)
    last, wrote = None, False
    try:
        with Client(args.host, args.port, token=_read_token(args.token_file), ca_file=args.tls_ca,
                    cert_file=args.tls_cert, key_file=args.tls_key, timeout=args.timeout) as client:
            for last in client.generate(prompt, **sampling):
                for o in last.outputs:
                    if o.index == 0 and o.text:
                        sys.stdout.write(o.text)
                        sys.stdout.flush()
                        wrote = True
    except grpc.RpcError as e:
        if wrote:  # end the partial line
            sys.stdout.write("\n")
            sys.stdout.flush()
        print(f"jaxinfer: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    sys.stdout.write("\n")
    sys.stdout.flush()
    finish = last.outputs[0].finish_reason if last is not None and last.outputs else 0
    if finish == pb.FINISH_REASON_ABORT:
        print("jaxinfer: error: the request was aborted on the server", file=sys.stderr)
        return 1
    if last is not None:
        u = last.usage
        log.info("%d prompt tokens (%d cached), %d generated tokens; finish: %s", u.prompt_tokens,
                 u.cached_tokens, u.completion_tokens,
                 pb.FinishReason.Name(finish).removeprefix("FINISH_REASON_").lower())
    return 0


def cmd_convert(args) -> int:
    from checkpoints import loader, orbax_io
    from jaxinfer.llm import DTYPES, default_dtype_name
    from jaxinfer.sharding import make_mesh

    dtype = args.dtype or default_dtype_name()
    model = loader.load(args.model, dtype=DTYPES[dtype], mesh=make_mesh(tensor=args.tensor_parallel),
                        quantization=args.quantization)
    orbax_io.save(args.output, model)
    log.info("saved %s to %s", model.source, args.output)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    if args.command == "serve":
        from serving import logs
        logs.configure(json=args.log_format == "json", level=level)
    else:
        logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return {"generate": cmd_generate, "convert": cmd_convert, "batch": cmd_batch, "serve": cmd_serve,
                "client": cmd_client}[args.command](args)
    except JaxinferError as e:
        print(f"jaxinfer: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("jaxinfer: interrupted", file=sys.stderr)
        return 130
    finally:
        while _opened:
            try:
                _opened.pop().close()
            except Exception as e:  # a process of the run is gone: nothing to let go
                log.warning("closing the engine: %s", e)


if __name__ == "__main__":
    sys.exit(main())
