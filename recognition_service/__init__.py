"""The recognition service: a trained (or encrypted) recognizer read over gRPC and mutual TLS."""
