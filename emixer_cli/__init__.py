"""The `emixer` command line: the layer on top of the library (`emixer_model`), the site
(`client`) and the coordinator (`server`); nothing below imports it.

`main.py` builds the parser from `commands/`, one module per command (its argparse parser and its
handler), and turns every `UserError` into one line and exit code 2. `common.py` holds what the
commands share: the console, progress bars, the error type and the default state dir;
`logs.py` routes every library's log records. A handler imports the library code it drives when
it runs, so `emixer --help` answers in a fraction of a second instead of loading torch and Flower.
"""
