"""Host policy: request state, sampling parameters, the scheduler, the page pool and prefix
cache, and the step shapes. Plain Python and numpy: nothing here imports jax (a test says
so), so it can be tested, benchmarked and reasoned about without compiling anything."""
