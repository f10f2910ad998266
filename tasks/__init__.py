"""Prefect tasks and the Ray actors they drive. `ray.remote` is applied here and only here."""
