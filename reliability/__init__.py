"""The reliability suite (`make reliability`, `python -m reliability`): the real stack under
load, cancellation, faults and hostile input, and docs/reliability.md with its figures.

    stack.py        make serve (python -m stack.serve) as a subprocess: processes, memory, gauges, ledger
    client.py       what one client got (complete, error event, OpenAI error, cut, refused, hung ...)
    load.py         64 streaming clients; a flood of streams their clients cancel
    faults.py       backend process, tritonserver, adapter killed or stopped under load
    fuzz.py         schemathesis over /openapi.json (hooks in schemathesis_hooks.py)
    hostile.py      hand-written hostile requests as raw bytes
    suite.py        the parts in order, each under a hard time bound
    report.py       docs/reliability.md
    profile.py      the full suite's sizes and the short one's (make test)
"""
