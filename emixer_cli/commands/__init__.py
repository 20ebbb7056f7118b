"""One module per `emixer` command: `add_parser(subparsers)` registers it, `run(args)` runs it.

`COMMANDS` is the order `emixer --help` lists them in: first run, then the site's, then the
coordinator's, then the researchers' and the privacy officer's.
"""

from emixer_cli.commands import (
    app_hash,
    audit,
    budget,
    data_check,
    demo,
    evaluate,
    keygen,
    phantoms,
    pretrain,
    public_convert,
    release,
    server,
    site,
    train_local,
    verify_release,
)

COMMANDS = (
    demo,
    phantoms,
    public_convert,
    data_check,
    train_local,
    release,
    pretrain,
    verify_release,
    budget,
    keygen,
    app_hash,
    evaluate,
    audit,
    server,
    site,
)
