"""A site's privacy, one job per module; each imports only those listed before it.

- `accounting`: the Opacus accountant a site keeps, epsilon from a history, the noise search;
- `policy`: what the site allows (site.yaml), enforced against any run config;
- `plan`: q, sigma and steps per round, fixed for the horizon, and the budget check;
- `ledger`: hashing models, signing a round's entry, verifying signed entries and histories;
- `state`: the site's privacy state on its own disk (plan, accountant, ledger file, audit log).

The coordinator's code imports `ledger` and `accounting` only (pyproject.toml's import-linter
contracts): it verifies what the sites signed and never reads or plans a site's state.
"""
