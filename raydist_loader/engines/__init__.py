"""Layer 5 (entry points): Hand-offs to serving engines: :mod:`.handoff` (engine-neutral: options, the rank's shard as
full-size tensors) and one module per engine (:mod:`.vllm`: the ``raydist`` load format). Engine modules import their
engine; this package does not."""
