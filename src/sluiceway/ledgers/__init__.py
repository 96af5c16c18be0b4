"""Ledgers on real databases (the interface and the embedded SQLite ledger are in ``ledger.py``).

One module per backend, imported only when a profile's ``ledger:`` URL names
its scheme (``backends.LEDGERS``), so a pipeline only needs the client library
of the backends it uses.
"""
