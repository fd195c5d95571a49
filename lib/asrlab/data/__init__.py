"""Corpora: loaders and splits that turn source files into manifest rows."""
