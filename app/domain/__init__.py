"""The domain core: items and generations, the errors every layer speaks, ids, the caller's
principal, and the ports the services need. Imports nothing of the app (tests/unit/
test_architecture.py checks it), so every other layer may depend on it."""
