"""Layer 3 (load): one rank's pull, Ray-free.

The transfers (host buffers, pinned staging ring + H2D copies), the worker (``ShardLoader``: the actor contract as a
plain class) and the replicas' rank side (``share``). Imports store/, connectors/ and the base modules.
"""
