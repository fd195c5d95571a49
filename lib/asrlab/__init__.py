"""asrlab."""
