"""authsvc: prior-authorization and eligibility service for healthcare providers."""

__version__ = "0.1.0"
