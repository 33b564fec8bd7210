"""The whole suite: one Triton repository key, shared by every tritonserver the tests
start and every adapter process they launch (both read TRITON_REPOSITORY_KEY)."""
import os
import secrets

os.environ.setdefault("TRITON_REPOSITORY_KEY", "test-" + secrets.token_urlsafe(16))
