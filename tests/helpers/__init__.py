"""Helpers the tests and the benches share: model files written as llama.cpp writes them, servers on loopback, engine runs, attention cases."""
