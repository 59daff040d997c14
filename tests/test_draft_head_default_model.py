"""A draft head trained for the default model on its own text (a short training by
scripts/train_draft_head.py, in a subprocess): it agrees with the model's next token well above chance, and
with it as the proposer the 24 prompts of test_speculative_default_model.py give the output without
speculation, token for token. (A file of its own so that the training runs beside the other tests.)"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from test_speculative_default_model import check_identity, plain_outputs


@pytest.fixture(scope="module")
def trained_head(tmp_path_factory):
    """A head trained briefly (60 steps on 16 answers of the model's own) by scripts/train_draft_head.py."""
    out = tmp_path_factory.mktemp("head") / "smollm2"
    script = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "train_draft_head.py"
    run = subprocess.run([sys.executable, str(script), "--out", str(out), "--prompts", "24", "--new-tokens", "32",
                          "--steps", "60", "--batch", "4", "--rows", "128", "--held-out", "8"],
                         capture_output=True, text=True, timeout=1200,
                         # Its compilations are its own: none is kept in the tests' shared disk cache.
                         env={**os.environ, "JAXINFER_XLA_CACHE": "off"})
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def test_a_head_trained_on_the_models_own_answers_agrees_with_it(trained_head):
    """Held-out answers: the head's first draft equals the model's next token well above chance (an untrained
    head: about never)."""
    meta = json.loads((trained_head / "head.json").read_text())
    assert meta["agreement_first"] > 0.05, meta  # untrained: 0.0% (step 1 of every run)


def test_greedy_output_is_token_identical_with_the_trained_head_on_24_prompts(default_model_path, trained_head):
    check_identity(default_model_path, plain_outputs(default_model_path), "trained head", trained_head)
