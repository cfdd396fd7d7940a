"""The FedOCR aggregator: rounds, streaming FedAvg, durable state and the gRPC service."""
