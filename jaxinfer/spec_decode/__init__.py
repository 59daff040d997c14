"""Speculative decoding's proposers: each guesses a sequence's next tokens for the target model to verify
in one step (jaxinfer/runner/rejection_sampler.py keeps what the target would have produced).

    proposer.py     the interface the scheduler asks (DraftQuery in, drafts out)
    ngram.py        prompt lookup: the sequence's own earlier text (host-side)
    draft_model.py  a second model with the target's vocabulary, its K/V at the target's page ids
    draft_head.py   a trained head of one layer over the target's hidden states (EAGLE-3 style)
"""
