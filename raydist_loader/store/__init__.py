"""Layer 2 (store): what a model is in a store, and the commands on it.

The sharding rules and presets, the chunk grid, the manifest, the pure per-rank plan and a chunk's reads in parts
(shared by ``verify`` and the rank's pull), publish/index, repo layouts, the write ledger, safetensors I/O, and the
store commands: verify, inspect (summary, sizing), gc, pull-files. Imports only connectors/ and the base modules.
"""
