"""The pure domain core: no Flask, SQLAlchemy, Dramatiq or requests imports here."""
