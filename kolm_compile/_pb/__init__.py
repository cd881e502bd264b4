"""Generated protobuf/gRPC stubs (internal; see proto/)."""
