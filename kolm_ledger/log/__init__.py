"""The log: validate and sequence appends, integrate them into the Merkle tree
under signed checkpoints, witness rounds, and the queries the service answers."""

__all__: list[str] = []
