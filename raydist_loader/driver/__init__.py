"""Layer 4 (driver): the Ray side.

Joining a cluster, the coordinator (placement group, one actor per rank), replicas, held actors, Ctrl-C and
progress. Imports load/, store/, connectors/ and the base modules.
"""
