"""One process of a multi-process LLM run (tests/test_multi_process.py starts two; each sizes its own KV pool):

    python -m tests.multi_process_llm COORDINATOR NUM_PROCESSES PROCESS_ID MODEL_DIR TP DP

Every process runs this same script, as on a pod; each prints the outputs its `generate` and
`stream` returned, as one JSON line after RESULT."""

import json
import sys

from jaxinfer import LLM, SamplingParams, distributed

PROMPTS = [[1, 5, 9, 13, 2, 7], [3, 4, 5], [8] * 11, [9, 9, 4, 1, 2]]
SAMPLING = [dict(max_tokens=12, temperature=0), dict(max_tokens=9, temperature=0.8, seed=7),
            dict(max_tokens=10, temperature=1.0, top_k=5, seed=3),
            dict(max_tokens=7, temperature=0.7, top_p=0.9, seed=11, n=2)]
PARAMS = [SamplingParams(**s) for s in SAMPLING]
STREAMED = ([2, 3, 4], SamplingParams(max_tokens=6, temperature=0))
ENGINE = dict(page_size=4, max_num_seqs=4, max_num_batched_tokens=32, progress=False)


def run(llm: LLM) -> list[list[int]]:
    """Every sample's tokens: generate's, then the stream's last output."""
    outs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    streamed = list(llm.stream(*STREAMED))
    return [list(o.token_ids) for r in outs for o in r.outputs] + [list(streamed[-1].outputs[0].token_ids)]


def main(coordinator: str, num_processes: str, process_id: str, model: str, tp: str, dp: str) -> None:
    distributed.initialize(coordinator, int(num_processes), int(process_id))
    with LLM(model, tensor_parallel_size=int(tp), data_parallel_size=int(dp), **ENGINE) as llm:
        print("RESULT", json.dumps({"leader": llm.is_leader, "tokens": run(llm)}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
