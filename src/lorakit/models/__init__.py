"""Base models and adapters: loading (embedded, GGUF, local, hub), precision, the LoRA model, the
adapter directory, the CPU LoRA dropout, llama.cpp's pre-tokenizer rules."""
