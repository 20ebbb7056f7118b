"""Helpers every benchmark shares, so all figures are measured and printed the same way.

Timing: median after warm-up (the first calls pay for allocation and lazy init, the median is robust
to the other helpers sharing the two cores). Memory: peak resident set size read from /proc (no
psutil dependency), resettable per measured phase, and summed over child processes for Ray.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from rich.table import Table

if TYPE_CHECKING:  # imported where used: most benchmarks never load the privacy code
    from emixer_model.config import EmixerConfig
    from emixer_model.data.site import SiteData
    from emixer_model.networks import EmixerNets
    from emixer_model.privacy.accounting import SiteAccountant
    from emixer_model.privacy.plan import PrivacyPlan
    from emixer_model.training import PrivateTrainer

from emixer_cli.common import new_console

console = new_console()


@dataclass
class Timing:
    """Seconds per call of a repeated measurement."""

    median: float
    low: float
    high: float
    repeats: int


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 2) -> Timing:
    """Median wall time of `fn` over `repeats` calls after `warmup` unmeasured ones."""
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return Timing(statistics.median(times), min(times), max(times), repeats)


def _status_kb(field: str, pid: int | str = "self") -> int:
    """One `kB` field of /proc/PID/status (0 when the process is gone or the field is missing)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def peak_rss_mb() -> float:
    """Peak resident memory of this process since start or the last reset_peak_rss()."""
    return _status_kb("VmHWM") / 1024


def reset_peak_rss() -> bool:
    """Reset this process' peak RSS (Linux clear_refs); False when the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from one pass over /proc."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name may hold spaces or parentheses: the ppid follows the last ')'
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def tree_rss_mb(root: int | None = None) -> float:
    """Current RSS summed over a process and all its descendants (Ray's raylet and workers)."""
    root = os.getpid() if root is None else root
    tree = _children()
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += _status_kb("VmRSS", pid)
        stack.extend(tree.get(pid, []))
    return total / 1024


class TreeRssSampler:
    """Samples tree_rss_mb() in a background thread; `.peak` is the largest sum seen.

    Sampling (not VmHWM) is needed because worker processes exit before we could read their peak.
    """

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_mb())
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeRssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def ratio(numerator: float, denominator: float) -> str:
    """`n/d` as a short string, '-' when undefined."""
    if denominator <= 0:
        return "-"
    return f"{numerator / denominator:.2f}x"


def verdict(value: float, target: float, higher_is_better: bool) -> str:
    """'met' / 'missed' with the margin, for the goal lines of every table."""
    ok = value >= target if higher_is_better else value <= target
    margin = value / target if target else float("inf")
    word = "met" if ok else "MISSED"
    return f"{word} ({margin:.2f}x of target)"


def print_table(
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[object]],
    notes: Sequence[str] = (),
) -> None:
    """The one table each benchmark prints, with free-text notes (targets, caveats) below it."""
    table = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(_cell(v) for v in row))
    console.print(table)
    for note in notes:
        console.print(f"  {note}")


def _cell(value: object) -> str:
    if isinstance(value, float):
        if value == 0 or 0.01 <= abs(value) < 1e5:
            return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
        return f"{value:.3g}"
    return str(value)


def machine() -> str:
    """One line describing where the figures were measured."""
    import torch

    cuda = "CUDA" if torch.cuda.is_available() else "no GPU"
    threads = torch.get_num_threads()
    load = os.getloadavg()[0]
    return (
        f"{os.cpu_count()} cores, {cuda}, torch {torch.__version__}, {threads} torch threads, "
        f"load average {load:.1f} at the end (other processes share the cores)"
    )


def site_plan(
    cfg: EmixerConfig, data: SiteData, accountant: SiteAccountant, rounds_left: int = 1
) -> PrivacyPlan:
    """The plan a site with the default policy (delta 1/(10 N), no noise floor) makes for `cfg`
    and `data`: the trainer takes sigma, q and the clip norm from nowhere else."""
    from emixer_model.privacy.plan import make_plan, plan_inputs
    from emixer_model.privacy.policy import SitePolicy

    policy = SitePolicy()
    inputs = plan_inputs(cfg, policy, len(data.units), data.per_patient)
    return make_plan(inputs, policy, accountant, rounds_left)


def planned_trainer(
    nets: EmixerNets,
    cfg: EmixerConfig,
    data: SiteData,
    noise_multiplier: float,
    *,
    secret_seed: int | None = 0,
    trainer_class: type[PrivateTrainer] | None = None,
) -> PrivateTrainer:
    """A trainer (PrivateTrainer, or `trainer_class`) at `noise_multiplier` on `site_plan`, with
    a fresh accountant of the config's kind. `secret_seed` makes sampling and noise
    reproducible: a measurement, never a deployment."""
    import torch

    from emixer_model.privacy.accounting import SiteAccountant
    from emixer_model.training import PrivateTrainer

    cfg = replace(cfg, privacy=replace(cfg.privacy, noise_multiplier=noise_multiplier))
    accountant = SiteAccountant(cfg.privacy.accountant)
    plan = site_plan(cfg, data, accountant)
    return (trainer_class or PrivateTrainer)(
        nets, cfg, accountant, torch.device("cpu"), plan=plan, secret_seed=secret_seed
    )


def write_phantoms(
    out: Path, sites: int, per_site: int, unlabeled: int, size: int, seed: int = 0
) -> list[Path]:
    """Phantom site folders for a benchmark (helper B's generator; small images keep it quick)."""
    from emixer_model.data.phantoms import write_phantom_sites

    return write_phantom_sites(
        out, sites=sites, per_site=per_site, unlabeled=unlabeled, seed=seed, size=size
    )


TIMINGS_FILE = "bench-site-timings.jsonl"


def _timed_site_round(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap train_site_round to append (site, round, start, end) to the run's state root."""

    def timed(site_dir: Path, state_dir: Path, cfg: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.time()
        try:
            return fn(site_dir, state_dir, cfg, *args, **kwargs)
        finally:
            record = {"site": Path(site_dir).name, "round": args[1], "start": start}
            record["end"] = time.time()
            with open(Path(cfg.federation.state_root) / TIMINGS_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")

    timed.bench_timed = True  # type: ignore[attr-defined]
    return timed


timed_client_app = ClientApp()


@timed_client_app.train()
def _timed_train(msg: Message, context: Context) -> Message:
    """client.app.train with train_site_round timed; patched where it runs (a Ray worker)."""
    import client.app as site_app

    if not getattr(site_app.train_site_round, "bench_timed", False):
        site_app.train_site_round = _timed_site_round(site_app.train_site_round)
    return site_app.train(msg, context)


@dataclass
class SimulationTimes:
    """Wall-clock marks of one simulated federation (time.time(), comparable across processes)."""

    start: float
    end: float
    rounds: dict[int, tuple[float, float]]  # round -> (configure_train start, aggregate_train end)
    sites: dict[int, list[tuple[str, float, float]]]  # round -> (site, start, end) of local work
    peak_tree_mb: float


def run_timed_simulation(
    cfg: Any, site_dirs: list[Path], root: Path, verbose: bool = False
) -> SimulationTimes:
    """server.tools.simulation.simulate with round and site timings and the process-tree
    peak RSS."""
    import ray.cloudpickle

    import bench.common
    import server.app
    import server.tools.simulation

    # Ray workers cannot import `bench` (not an installed package): ship this module by value.
    ray.cloudpickle.register_pickle_by_value(bench.common)
    rounds: dict[int, list[float]] = {}
    make_strategy = server.app.make_strategy

    def timed_strategy(*args: Any, **kwargs: Any) -> Any:
        strategy = make_strategy(*args, **kwargs)
        configure, aggregate = strategy.configure_train, strategy.aggregate_train

        def configure_train(server_round: int, *a: Any, **k: Any) -> Any:
            rounds[server_round] = [time.time(), 0.0]
            return configure(server_round, *a, **k)

        def aggregate_train(server_round: int, *a: Any, **k: Any) -> Any:
            try:
                return aggregate(server_round, *a, **k)
            finally:
                rounds[server_round][1] = time.time()

        strategy.configure_train, strategy.aggregate_train = configure_train, aggregate_train
        return strategy

    state_root = root / "state"
    state_root.mkdir(parents=True, exist_ok=True)
    saved_app = server.tools.simulation.client_app
    server.app.make_strategy, server.tools.simulation.client_app = timed_strategy, timed_client_app
    try:
        with TreeRssSampler() as sampler:
            start = time.time()
            server.tools.simulation.simulate(
                cfg, site_dirs, state_root, root / "ckpt", verbose=verbose
            )
            end = time.time()
    finally:
        server.app.make_strategy, server.tools.simulation.client_app = make_strategy, saved_app
        ray.cloudpickle.unregister_pickle_by_value(bench.common)
    sites: dict[int, list[tuple[str, float, float]]] = {}
    timings = state_root / TIMINGS_FILE
    lines = timings.read_text().splitlines() if timings.is_file() else []
    for line in lines:
        r = json.loads(line)
        sites.setdefault(int(r["round"]), []).append((r["site"], r["start"], r["end"]))
    return SimulationTimes(
        start, end, {k: (v[0], v[1]) for k, v in rounds.items()}, sites, sampler.peak
    )


def busy_span(intervals: Sequence[tuple[float, float]]) -> float:
    """Length of the union of intervals: time during which at least one site was computing."""
    total, reach = 0.0, float("-inf")
    for lo, hi in sorted(intervals):
        if hi > reach:
            total += hi - max(lo, reach)
            reach = hi
    return total
