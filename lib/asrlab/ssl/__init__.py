"""The soft_tokens study's models: a small HuBERT upstream (masked prediction) and the token/feature CTC downstream."""
