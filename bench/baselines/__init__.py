"""Peers' eager idioms, written from their published semantics; shared by benchmarks and tests."""
