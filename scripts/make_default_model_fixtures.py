"""Reference outputs of HF transformers for the default model (SmolLM2-135M-Instruct
Q4_1 GGUF), loaded from the same GGUF file jaxinfer uses.

Writes tests/data/default_model_reference.json: per prompt, the token ids
(prompt, then HF's 32 greedy tokens), the argmax HF's logits give at every
position (teacher-forced), and the top-1/top-2 logit margin there. Run with an
environment that has torch, transformers and gguf:

    python scripts/make_default_model_fixtures.py
"""

import argparse
import json
import pathlib
import sys

import torch
import transformers

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from checkpoints.default_model import default_model_path  # noqa: E402

CHAT = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Give me three tips for writing clean Python code."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
]
TEXT = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "import numpy as np\n\n\ndef normalize(x: np.ndarray) -> np.ndarray:\n",
    "The history of the Roman Empire spans more than a thousand years, beginning with",
    "Once upon a time, in a small village at the edge of a great forest, there lived",
    "Photosynthesis is the process by which green plants",
    "SELECT name, COUNT(*) FROM orders WHERE",
    "1, 2, 3, 5, 8, 13, 21,",
]
NEW_TOKENS = 32


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="tests/data/default_model_reference.json")
    args = parser.parse_args()
    gguf = default_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
    model.eval()
    cases = [("chat", tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True), m)
             for m in CHAT] + [("text", t, None) for t in TEXT]
    out = []
    for kind, text, messages in cases:
        ids = tok(text, add_special_tokens=kind == "text")["input_ids"]
        seq = torch.tensor([ids])
        with torch.no_grad():
            for _ in range(NEW_TOKENS):  # plain greedy, EOS not special
                nxt = model(seq).logits[0, -1].argmax()
                seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
            logits = model(seq).logits[0]
        top2 = logits.topk(2, dim=-1)
        out.append({
            "kind": kind, "text": text, "messages": messages,
            "prompt_len": len(ids), "ids": seq[0].tolist(),
            "argmax": logits.argmax(-1).tolist()[:-1],
            "margin": (top2.values[:, 0] - top2.values[:, 1]).tolist()[:-1],
        })
        print(f"{kind}: {len(ids)} prompt tokens: {tok.decode(seq[0, len(ids):])!r}")
    meta = {"transformers": transformers.__version__, "torch": torch.__version__,
            "model": gguf.name, "new_tokens": NEW_TOKENS}
    pathlib.Path(args.out).write_text(json.dumps({"meta": meta, "cases": out}))
    print("positions:", sum(len(c["argmax"]) for c in out))


if __name__ == "__main__":
    main()
