"""The device side: a step's inputs as one value (step_inputs, batch), the model runner and
its compiled steps (model_runner, compilations), the KV cache and the sampler."""
