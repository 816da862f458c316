"""Aside (testing, imported by no product module): Test helpers that ship with the package, kept out of the product's
own modules.

Nothing in ``raydist_loader`` outside this package imports it. ``tiny_models``: tiny random checkpoints written by
transformers itself (needs the ``test`` extra's transformers), for tests, the demo and benchmarks; ``quantized``: the
same models quantized as FP8 / compressed-tensors checkpoints ship (float8 weights and their scales). ``faulty``: the
``faulty+<scheme>://`` connector wrapper that fails, delays or corrupts chosen reads, for fault-injection tests.
"""
