"""gRPC servers of the engine: the only package in engine/ that imports protoserve.v1 stubs."""
