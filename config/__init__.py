"""Settings, read once from the environment, and the Celery configuration built from them:
the package ``plural_cancel.config``."""

if __name__ == "config":
    # The short name (from the repository root): no submodules of its own, so the settings
    # never load twice: `from config.settings import ...` fails instead.
    __path__ = []
