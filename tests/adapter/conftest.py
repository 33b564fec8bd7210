"""The adapter tests' helpers (adapter_testlib) are registered by tests/conftest.py."""
