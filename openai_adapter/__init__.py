"""OpenAI-compatible HTTP API over Triton decoupled gRPC streams (see README.md)."""
