"""The process helpers live in support/ (bench/ uses them too); tests may import them here."""

from support.processes import REPO, free_port, spawn_webvirt, wait_until_serving

__all__ = ["REPO", "free_port", "spawn_webvirt", "wait_until_serving"]
