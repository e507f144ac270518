"""Settings, read once from the environment, and the Celery configuration built from them:
the package ``plural_cancel.config``."""

if __name__ == "config":
    # The short name, inside this repository: the namespaced module takes its place.
    from plural_cancel._short_names import install

    install(__name__)
