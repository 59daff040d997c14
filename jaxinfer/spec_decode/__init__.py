"""Speculative decoding's proposers: each guesses a sequence's next tokens for the target model to verify
in one step (jaxinfer/runner/rejection_sampler.py keeps what the target would have produced)."""
