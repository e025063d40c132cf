"""Domain services of the CA: what happens for each request, independent of gRPC."""
