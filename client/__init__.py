"""The gRPC client library and the ``lumireg register`` command. Needs no torch."""
