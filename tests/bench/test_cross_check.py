"""bench.cross_check's reading of perf_analyzer's report (no server, no perf_analyzer)."""
from bench.cross_check import parse

MEASURED = """Request concurrency: 16
  Client:
    Request count: 352
    Throughput: 9.77551 infer/sec
    Avg latency: 1600553 usec (standard deviation 84210 usec)
    p50 latency: 1600553 usec
    p90 latency: 1710204 usec
    p95 latency: 1750000 usec
    p99 latency: 1822120 usec
Inferences/Second vs. Client Average Batch Latency
Concurrency: 16, throughput: 9.77551 infer/sec, latency 1600553 usec
"""

FAILED = """Request concurrency: 1
WARNING: Pass contained only one request, so sample latency standard deviation will be infinity (UINT64_MAX).
Failed to retrieve results from inference request.
Thread [0] had error: OpenAI response returns HTTP code 400
"""


def test_a_measured_concurrency_gives_its_rate_and_latencies():
    assert parse(MEASURED) == {"requests_per_s": 9.77551, "latency_p50_ms": 1600.6, "latency_p90_ms": 1710.2,
                               "latency_p99_ms": 1822.1}


def test_a_run_that_did_not_measure_says_why():
    assert parse(FAILED) == {"error": "Failed to retrieve results from inference request. / "
                                      "Thread [0] had error: OpenAI response returns HTTP code 400"}
    assert "stable" in parse("Failed to obtain stable measurement within 10 measurement windows")["error"]
