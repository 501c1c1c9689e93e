"""Certificates and keys of a deployment (`scdd certs`): TLS for the SuperLink, SuperNode authentication keys.

Not part of the Flower app bundle: operators run it once, before any app starts.
"""
