"""The berth.v1 gRPC stubs (``workers_pb2``, ``workers_pb2_grpc``, ``host_pb2``, …).

Generated from ``proto/berth/v1/*.proto`` by ``grpc_tools.protoc`` when the package is built
(see ``setup.py``); never edited by hand.
"""
