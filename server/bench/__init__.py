"""The benchmark (`scdd benchmark`): every method on the same sites and splits, scored on real held-out cells.

Not part of the Flower app bundle: it drives the shipped ServerApp and ClientApp in-process.
"""
