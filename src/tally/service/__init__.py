"""Use cases: one function per thing a caller can ask of Tally. Each decides its transaction:
commerce, refunds and support open their own unit of work; the ledger's changes may share one
through the group commit (see ledger.py)."""
