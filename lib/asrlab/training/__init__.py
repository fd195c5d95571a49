"""The one trainer every study uses, its batching and its checkpoints."""
