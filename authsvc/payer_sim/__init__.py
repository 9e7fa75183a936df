"""The `demo` payer simulator (Da Vinci PAS 2.2.1 / FHIR R4), run by `authsvc payer-sim`."""

from authsvc.payer_sim.app import SimServer, create_sim_app, run_sim

__all__ = ["SimServer", "create_sim_app", "run_sim"]
