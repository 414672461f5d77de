"""Generation: batched generate, the chat REPL, the batch engine with its cache and sampler, the
OpenAI-compatible server and who may talk to it."""
