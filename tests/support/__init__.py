"""What the suite stands on, by concern; tests/conftest.py loads the modules with fixtures as
pytest plugins, and tests import their helpers from them."""
