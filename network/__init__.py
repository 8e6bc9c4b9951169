"""The registration network, its checkpoint format and the bundled default weights."""
