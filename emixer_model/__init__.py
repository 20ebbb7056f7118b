"""EMIXER-FL: the networks, data, privacy and training code that every process imports.

Importing it keeps Flower's log records from also reaching the root logger. opacus calls
`logging.basicConfig` when imported, which gives the root logger a stderr handler; Flower's logger
has its own console handler and propagates, so every process that imports both (the ServerApp and
ClientApp processes behind `emixer server` and `emixer site`, the simulation's Ray actors) printed
each Flower line twice. The CLI routes Flower's records itself and turns propagation back on
(`emixer_cli.logs.configure_logging`).
"""

import logging

logging.getLogger("flwr").propagate = False
