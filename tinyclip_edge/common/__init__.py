"""Leaf utilities shared by the compression core, `export` and `runtimes`.

Nothing here imports another part of the project, and torch is imported lazily where needed, so a
Jetson that installs only the runtimes can still use tokenizers and preprocessing.
"""
