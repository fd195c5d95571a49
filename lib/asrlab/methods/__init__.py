"""One module per paper's method: task_vectors (syn2real), hdmole, efin, soft_tokens."""
