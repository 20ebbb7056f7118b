"""Run the federation on this machine with Flower's simulation engine (Ray): one simulated site per
folder. The demo, the tests and the benchmarks all start federated runs through this function."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from flwr.simulation import run_simulation

from client.app import app as client_app
from emixer_model.config import EmixerConfig
from server.app import make_server_app
from server.checkpoint import Checkpoint, latest_checkpoint


def simulate(
    cfg: EmixerConfig,
    site_dirs: list[Path],
    state_root: Path,
    checkpoint_dir: Path,
    verbose: bool = False,
) -> Checkpoint:
    """Federated DP training over `site_dirs`; returns the newest checkpoint.

    Ray runs as many sites at once as there are cores (each site's torch uses one thread), and is
    shut down before returning, so nothing is left running.
    """
    cfg = replace(
        cfg,
        federation=replace(
            cfg.federation,
            site_dirs=",".join(str(Path(d).resolve()) for d in site_dirs),
            state_root=str(Path(state_root).resolve()),
            checkpoint_dir=str(Path(checkpoint_dir).resolve()),
            min_sites=min(cfg.federation.min_sites, len(site_dirs)),
        ),
    )
    cores = os.cpu_count() or 1
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        # the sites' (Ray actors') own output reaches this terminal only with --verbose;
        # otherwise it stays in Ray's session folder (/tmp/ray/session_latest/logs)
        "init_args": {"num_cpus": cores, "include_dashboard": False, "log_to_driver": verbose},
    }
    try:
        # run_simulation is deprecated in flwr 1.42 (its banner goes to the log file, see
        # emixer_cli.logs.configure_logging) but it is the only supported in-process entry
        # point: its replacement, `flwr run` on the local simulation runtime, starts a SuperLink
        # and a `flwr-simulation` process and loads the app from a bundle, so it cannot take
        # the ServerApp object built here from a Python config, nor be driven by the tests.
        run_simulation(
            server_app=make_server_app(cfg),
            client_app=client_app,
            num_supernodes=len(site_dirs),
            backend_config=backend_config,
            verbose_logging=verbose,
        )
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    ckpt = latest_checkpoint(Path(checkpoint_dir))
    if ckpt is None:
        raise RuntimeError(
            f"the federated run wrote no checkpoint in {checkpoint_dir}; see the log above"
        )
    return ckpt
