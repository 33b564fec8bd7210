"""Accounts: API keys, per-key limits and budgets, the usage ledger.

The adapter talks to `Accounts` (service.py) once per request step; `manage.py` is the
administration (llm-admin); `ledger.py` the transactions; `limits.py` the arithmetic;
`schema.py` and `migrations/` the tables; `store.py` the engines.
"""
from .ledger import Admitted, Principal, Usage
from .limits import Reserve, reserve_for
from .service import ANONYMOUS, Accounts

__all__ = ["Accounts", "Admitted", "ANONYMOUS", "Principal", "Reserve", "Usage", "reserve_for"]
