"""protoserve: the public gRPC contract (generated stubs under protoserve.v1) and version."""

__version__ = "0.1.0"
