"""Generated protobuf/gRPC stubs for protoserve.v1 (do not edit; see scripts/gen_protos.py)."""
