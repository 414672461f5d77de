"""Merge and export: merged checkpoints, GGUF files, Ollama's Modelfile and template, vLLM, and
the per-family facts llama.cpp needs."""
