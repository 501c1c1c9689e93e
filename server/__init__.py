"""The coordinator side of fedscdd.

Rooms (ARCHITECTURE.md):

- ``server/*.py``: the ServerApp and what it runs (orchestration, averaging, fusion, run outputs); in the app bundle.
- ``server/cli/``: the `scdd` command and local tooling (checks, single-site distillation, simulation, demo,
  deployment helpers); not in the bundle.
- ``server/bench/``: the benchmark; not in the bundle.
- ``server/pki/``: certificates and keys of a deployment; not in the bundle.
"""
