"""Model: loading the base LLM, prompts, retrieval of demonstrations, scoring and decoding answers."""
