"""Protobuf/gRPC definitions. The *_pb2*.py(i) files are generated: run scripts/gen_protos.py."""
