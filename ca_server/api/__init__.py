"""gRPC transport of the CA: servicers translate protobuf to domain calls and back."""
