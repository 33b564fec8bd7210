"""`llm-deploy`: put a new export of a model into service on running Triton servers —
load it beside the serving version, validate it, switch traffic, roll back, retire."""
