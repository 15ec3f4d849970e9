"""Adapters that make musc_fast a backend of other frontends.

Nothing is imported here: ``musc_fast.integrations.anomalib`` needs the optional ``anomalib`` extra
(``pip install "musc-fast[anomalib]"``) and is the only module of the package that imports anomalib.
"""
