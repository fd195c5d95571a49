"""Audio: TTS engines, the simulated channel, reading/validating audio and log-mel features."""
