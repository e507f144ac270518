"""Helpers the tests share (processes to start, clients to talk to them)."""
