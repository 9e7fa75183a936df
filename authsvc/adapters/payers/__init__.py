"""Payer adapters: the only code that talks HTTP to payers (registry + one module per protocol)."""
