"""The deployment path for real: certificates, a TLS SuperLink with SuperNode authentication, and
authenticated SuperNodes on 127.0.0.1 running one tiny federated round.

Every process is started here by pid and stopped in a finally block; the flwr CLI and the
SuperNodes use private FLWR_HOME folders under tmp_path, never ~/.flwr.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from bench.site_knowledge import RECIPES
from client.daemon import SiteSettings, load_site_settings, prepare_supernode
from emixer_cli.commands.site import check_site
from emixer_cli.main import main
from emixer_model.config import (
    SITE_KNOWLEDGE_TRAIN,
    ConfigError,
    EmixerConfig,
    ModelConfig,
    TrainConfig,
    load_yaml_as,
)
from emixer_model.privacy.ledger import SiteKey
from emixer_model.shared import app_hash, stop_process_group
from server.checkpoint import latest_checkpoint
from server.tools.launch import (
    FlwrCli,
    ServerFile,
    ServerSettings,
    SiteEntry,
    load_server_settings,
    run_config,
    stage_app,
    start_superlink,
    write_flwr_home,
)
from server.tools.release import ReleaseRefused, check_privacy_gate, read_public_keys

ROOT = Path(__file__).resolve().parent.parent
MAKE_CERTS = ROOT / "deploy" / "make-certs.sh"
RUN_TIMEOUT = 150.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_certs(out: Path) -> None:
    subprocess.run(["bash", str(MAKE_CERTS), str(out)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The coordinator's CA and TLS certificate; each site's key made as a site makes it (in
    the tests the sites' keys share one folder; in a deployment each stays at its site)."""
    out = tmp_path_factory.mktemp("certs")
    make_certs(out)
    for site in ("site-a", "site-b", "site-c", "rogue"):
        assert main(["keygen", "--out", str(out / "sites" / f"{site}.key")]) == 0
    return out


def test_make_certs_makes_no_site_key_and_never_overwrites(certs: Path) -> None:
    before = {p.name: p.read_bytes() for p in certs.rglob("*") if p.is_file()}
    make_certs(certs)  # re-run: keeps everything
    after = {p.name: p.read_bytes() for p in certs.rglob("*") if p.is_file()}
    assert after == before
    refused = subprocess.run(
        ["bash", str(MAKE_CERTS), str(certs), "site-d"], capture_output=True, text=True
    )
    assert refused.returncode == 2 and "emixer keygen" in refused.stderr
    assert not (certs / "sites" / "site-d.key").exists()


def test_a_site_makes_its_own_key_and_only_the_public_half_travels(tmp_path: Path) -> None:
    key = tmp_path / "keys" / "hospital.key"
    assert main(["keygen", "--out", str(key)]) == 0
    assert key.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert key.stat().st_mode & 0o077 == 0  # readable by the site's user only
    pub = (tmp_path / "keys" / "hospital.pub").read_text()
    assert pub.startswith("ecdsa-sha2-nistp256 ") and "PRIVATE" not in pub
    assert main(["keygen", "--out", str(key)]) == 2  # never overwritten
    assert SiteKey.load(key).public_key() == pub.strip()


def test_ca_and_server_certificate_verify(certs: Path) -> None:
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(certs / "ca.crt"), str(certs / "server.crt")],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stderr
    text = subprocess.run(
        ["openssl", "x509", "-in", str(certs / "server.crt"), "-noout", "-text"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "IP Address:127.0.0.1" in text and "DNS:localhost" in text


def write_server_yaml(path: Path, certs: Path, extra: str = "") -> Path:
    path.write_text(
        f"listen: {{host: 127.0.0.1, port: 19092}}\n"
        f"certificates: {{ca: {certs}/ca.crt, cert: {certs}/server.crt, key: {certs}/server.key}}\n"
        f"sites:\n  - {{name: site-a, public_key: {certs}/sites/site-a.pub}}\n"
        f"state_dir: state\n"
        f"run: {{federation: {{rounds: 2}}, model: {{resolution: 16}}}}\n" + extra
    )
    return path


def test_server_yaml_is_strict(tmp_path: Path, certs: Path) -> None:
    settings = load_server_settings(write_server_yaml(tmp_path / "server.yaml", certs))
    assert settings.state_dir == tmp_path / "state"
    assert settings.run.federation.rounds == 2 and settings.run.model.resolution == 16
    cfg = run_config(settings)
    assert Path(cfg.federation.checkpoint_dir) == tmp_path / "state" / "checkpoints"
    with pytest.raises(ConfigError, match="resumee"):
        load_server_settings(write_server_yaml(tmp_path / "s2.yaml", certs, "resumee: true\n"))
    bad_run = tmp_path / "s3.yaml"
    bad_run.write_text(
        write_server_yaml(bad_run, certs).read_text().replace("rounds: 2", "roundz: 2")
    )
    with pytest.raises(ConfigError, match="run.federation.roundz"):
        load_server_settings(bad_run)
    missing = tmp_path / "s4.yaml"
    missing.write_text(
        write_server_yaml(missing, certs).read_text().replace("site-a.pub", "nobody.pub")
    )
    with pytest.raises(ConfigError, match="nobody.pub"):
        load_server_settings(missing)
    text = write_server_yaml(tmp_path / "s5.yaml", certs).read_text()
    cases = {  # the one config loader: types, required sections and list entries by name
        text.replace("port: 19092", "port: high"): "listen.port must be an integer",
        text.replace("resolution: 16", "resolution: 16.5"): "run.model.resolution",
        "\n".join(line for line in text.splitlines() if "certificates" not in line): (
            "server.yaml: needs 'certificates'"
        ),
        text.replace("name: site-a, ", ""): r"needs 'sites\[0\].name'",
        re.sub(r"sites:\n.*\n", "sites: []\n", text): "at least one",
        text + "sitez: []\n": "unknown key 'sitez'",
    }
    for i, (body, message) in enumerate(cases.items()):
        path = tmp_path / f"case{i}" / "server.yaml"
        path.parent.mkdir()
        path.write_text(body)
        with pytest.raises(ConfigError, match=message):
            load_server_settings(path)


def test_site_yaml_is_strict_and_checks_paths(tmp_path: Path, certs: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    base = (
        f"superlink: 127.0.0.1:9092\nroot_certificate: {certs}/ca.crt\n"
        f"private_key: {certs}/sites/site-a.key\ndata_path: data\nsite_name: a\n"
        f"epsilon_budget: 4\napproved_app_hash: {app_hash()}\n"
    )
    good = tmp_path / "site.yaml"
    good.write_text(base + "state_dir: state\nmin_noise_multiplier: 0.8\n")
    settings = load_site_settings(good)
    assert settings.node_config() == {
        "data-path": str(data),
        "state-dir": str(tmp_path / "state"),
        "site-name": "a",
        "signing-key": str(certs / "sites" / "site-a.key"),  # node-auth key signs the ledger
        "epsilon-budget": 4.0,
        "min-noise-multiplier": 0.8,
        "share-losses": False,
        "holdout-fraction": 0.0,  # the site's own: a run config's is ignored
        "require-secure-mode": False,
    }
    cases = {
        "state_dir: state\nbudget: 4\n": "'budget'",
        "state_dir: state\nmax_delta: 2\n": "max_delta must be between 0 and 1",
        "state_dir: state\nshare_losses: 1\n": "true or false",
        "state_dir: data/state\n": "outside the data folder",
        "state_dir: state\nholdout_fraction: 1.5\n": "holdout_fraction must be in",
    }
    for extra, message in cases.items():
        good.write_text(base + extra)
        with pytest.raises(ConfigError, match=message):
            load_site_settings(good)
    good.write_text(base.replace("epsilon_budget: 4\n", "") + "state_dir: s\n")
    with pytest.raises(ConfigError, match="needs 'epsilon_budget'"):  # the site states its own
        load_site_settings(good)
    good.write_text(base.replace(app_hash(), "abc") + "state_dir: s\n")
    with pytest.raises(ConfigError, match="64-character"):
        load_site_settings(good)
    good.write_text(base.replace("data_path: data", "data_path: nowhere") + "state_dir: s\n")
    with pytest.raises(ConfigError, match="data_path: .*nowhere"):
        load_site_settings(good)


def test_staged_app_declares_every_run_config_key(tmp_path: Path) -> None:
    cfg = EmixerConfig(model=ModelConfig(resolution=16, width=8))
    app = stage_app(tmp_path / "app", cfg)
    pyproject = tomllib.loads((app / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == cfg.to_run_config()
    assert (app / "client" / "app.py").is_file() and (app / "server" / "app.py").is_file()


def test_site_check_compares_the_app_hash(tmp_path: Path, certs: Path) -> None:
    from emixer_model.data.phantoms import write_phantom_sites

    [data] = write_phantom_sites(tmp_path / "data", sites=1, size=32, per_site=4, unlabeled=1)
    settings = SiteSettings(
        superlink="127.0.0.1:9092",
        root_certificate=certs / "ca.crt",
        private_key=certs / "sites" / "site-a.key",
        data_path=data,
        state_dir=tmp_path / "state",
        site_name="a",
        approved_app_hash=app_hash(),
    )
    assert check_site(settings) == 0
    assert check_site(replace(settings, approved_app_hash="0" * 64)) == 2


def test_server_reports_a_superlink_that_cannot_start(
    tmp_path: Path, certs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_server_yaml(tmp_path / "server.yaml", certs)
    # the CA certificate is no private key: flower-superlink exits at once
    config.write_text(config.read_text().replace("key: " + str(certs / "server.key"), "key: x"))
    (tmp_path / "x").write_text("not a key\n")
    code = main(["server", "--config", str(config)])
    assert code == 2
    assert "flower-superlink exited" in capsys.readouterr().out


def node_status(cli: FlwrCli) -> dict[str, str]:
    return {n["node-id"]: n["status"] for n in cli.json("supernode", "ls", "emixer")["nodes"]}


def wait_for(predicate, what: str, timeout: float = 60.0, every: float = 1.0) -> None:
    """Poll `predicate`; each poll is a flwr CLI call, so the run is polled sparsely."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


class Deployment:
    """A TLS SuperLink with node auth and our staged app, plus SuperNodes started on demand; every
    process is tracked by pid and stopped by close()."""

    def __init__(self, tmp_path: Path, certs: Path, cfg: EmixerConfig, names: list[str]) -> None:
        self.tmp_path, self.certs = tmp_path, certs
        self.server = ServerSettings(
            host="127.0.0.1",
            port=free_port(),
            ca_cert=certs / "ca.crt",
            cert=certs / "server.crt",
            key=certs / "server.key",
            sites=[SiteEntry(n, certs / "sites" / f"{n}.pub") for n in names],
            state_dir=tmp_path / "server",
            run=cfg,
        )
        self.app_dir = stage_app(self.server.state_dir / "app", run_config(self.server))
        write_flwr_home(self.server.state_dir / "flwr-home", self.server)
        self.cli = FlwrCli(self.server.state_dir / "flwr-home")
        self.procs: list[subprocess.Popen] = []
        self.superlink = start_superlink(self.server)

    def site(self, name: str, data: Path, approved: str | None = None) -> SiteSettings:
        """A site's settings; it approves this install's app unless `approved` says otherwise."""
        return SiteSettings(
            superlink=self.server.control_address,
            root_certificate=self.certs / "ca.crt",
            private_key=self.certs / "sites" / f"{name}.key",
            data_path=data,
            state_dir=self.tmp_path / "sites" / name,
            site_name=name,
            approved_app_hash=approved or app_hash(),
            runtime_port=free_port(),
        )

    def start(self, settings: SiteSettings) -> subprocess.Popen:
        command, env = prepare_supernode(settings)
        with (self.tmp_path / f"{settings.site_name}.log").open("a") as log:
            proc = subprocess.Popen(
                [*command, "--max-retries", "3"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def online(self) -> int:
        return list(node_status(self.cli).values()).count("online")

    def logs(self, run_id: int) -> str:
        """The run's ServerApp log, for failure messages."""
        command = ["flwr", "log", str(run_id), "emixer", "--show"]
        done = subprocess.run(command, env=self.cli.env, capture_output=True, text=True)
        return done.stdout[-4000:] + done.stderr[-1000:]

    def wait_for_run(self, run_id: int, timeout: float = RUN_TIMEOUT) -> None:
        finished = lambda: self.cli.run_status(run_id)[0].startswith("finished")  # noqa: E731
        try:
            wait_for(finished, "the run", timeout, every=5.0)
        except AssertionError as err:
            raise AssertionError(f"{err}\n{self.logs(run_id)}") from None
        status, details = self.cli.run_status(run_id)
        assert status == "finished:completed", f"{details}\n{self.logs(run_id)}"

    def close(self) -> None:
        for proc in self.procs:  # signal all first: each SuperNode takes a moment to deregister
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            stop_process_group(proc)
        stop_process_group(self.superlink)
        for proc in [*self.procs, self.superlink]:
            assert proc.poll() is not None


def still_running(proc: subprocess.Popen, grace: float = 30.0) -> bool:
    """True when a just-started SuperNode is still up after `grace` seconds (it connected)."""
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        return True
    return False


def tiny_deployment_config(rounds: int, min_sites: int, round_timeout: float) -> EmixerConfig:
    cfg = EmixerConfig(
        model=ModelConfig(resolution=16, width=8, embed_dim=32),
        train=TrainConfig(batch_size=8),
    )
    cfg.federation.rounds, cfg.federation.min_sites = rounds, min_sites
    cfg.federation.round_timeout = round_timeout
    return cfg


def test_tls_superlink_authenticated_supernodes_run_one_round(tmp_path: Path, certs: Path) -> None:
    from emixer_model.data.phantoms import write_phantom_sites

    site_dirs = write_phantom_sites(tmp_path / "data", sites=3, size=32, per_site=16, unlabeled=4)
    cfg = tiny_deployment_config(rounds=1, min_sites=2, round_timeout=3600.0)
    deployment = Deployment(tmp_path, certs, cfg, ["site-a", "site-b", "site-c"])
    sites = [
        deployment.site("site-a", site_dirs[0], approved=app_hash()),  # as `emixer app-hash` prints
        deployment.site("site-b", site_dirs[1]),
        deployment.site("site-c", site_dirs[2], approved="0" * 64),  # approved another version
    ]
    try:
        for entry in deployment.server.sites:
            assert "enrolled" in deployment.cli.enrol(entry)
        assert "earlier" in deployment.cli.enrol(deployment.server.sites[0])  # idempotent

        refused = deployment.start(deployment.site("rogue", site_dirs[0]))
        for settings in sites:
            deployment.start(settings)
        assert refused.wait(timeout=60) != 0, "a SuperNode with an unenrolled key was admitted"
        wait_for(lambda: deployment.online() == 3, "three sites online")

        run_id = deployment.cli.submit(deployment.app_dir)
        deployment.wait_for_run(run_id)
        ckpt = latest_checkpoint(deployment.server.state_dir / "checkpoints")
        # each site signed with its node-auth key: the gate verifies against the enrolled keys
        enrolled = read_public_keys([certs / "sites"])
        trained = {name: enrolled[name] for name in ("site-a", "site-b")}
        assert set(check_privacy_gate(ckpt, None, trained)["sites"]) == {"site-a", "site-b"}
        # site-c refused the app, so it signed nothing: with its key the gate names it missing
        with pytest.raises(ReleaseRefused, match="enrolled site site-c signed no entry"):
            check_privacy_gate(ckpt, None, {**trained, "site-c": enrolled["site-c"]})
        for settings in sites[:2]:
            assert (settings.state_dir / "privacy" / "ledger.jsonl").is_file()
        # the gate in front of the app checked the bundle at each site (the app has no check)
        for settings in sites[:2]:
            audit = (settings.state_dir / "audit.log").read_text()
            assert f'"event": "app-approved", "run": {run_id}' in audit
        audit = (sites[2].state_dir / "audit.log").read_text().splitlines()
        refusals = [json.loads(line) for line in audit if "refused-app" in line]
        assert refusals and "approved app 000000000000" in refusals[0]["message"]
        assert not (sites[2].state_dir / "privacy" / "ledger.jsonl").exists()
    finally:
        deployment.close()


def test_a_site_lost_mid_round_is_waited_for_then_rejoins_with_its_ledger(
    tmp_path: Path, certs: Path
) -> None:
    """site-b dies after it is online: round 1 ends at the round timeout with site-a alone; the
    hospital restarts site-b, which rejoins a later round with its own ledger carrying on."""
    from emixer_model.data.phantoms import write_phantom_sites
    from server.checkpoint import latest_checkpoint

    site_dirs = write_phantom_sites(tmp_path / "data", sites=2, size=32, per_site=16, unlabeled=4)
    cfg = tiny_deployment_config(rounds=3, min_sites=2, round_timeout=90.0)
    deployment = Deployment(tmp_path, certs, cfg, ["site-a", "site-b"])
    site_a = deployment.site("site-a", site_dirs[0])
    site_b = deployment.site("site-b", site_dirs[1])
    try:
        for entry in deployment.server.sites:
            deployment.cli.enrol(entry)
        deployment.start(site_a)
        b_process = deployment.start(site_b)
        wait_for(lambda: deployment.online() == 2, "two sites online")
        os.killpg(b_process.pid, signal.SIGKILL)  # gone without a word: no deregistration
        b_process.wait(timeout=30)
        run_id = deployment.cli.submit(deployment.app_dir)
        checkpoints = deployment.server.state_dir / "checkpoints"
        try:
            wait_for(lambda: (checkpoints / "round-0001.pt").exists(), "round 1", RUN_TIMEOUT)
        except AssertionError:
            raise AssertionError(deployment.logs(run_id)) from None
        # the hospital restarts its daemon; like systemd's Restart=on-failure, start it again while
        # the SuperLink still holds the dead session (it refuses a second activation of a key)
        deadline = time.monotonic() + RUN_TIMEOUT
        while not still_running(deployment.start(site_b)) and time.monotonic() < deadline:
            time.sleep(5)
        deployment.wait_for_run(run_id, timeout=2 * RUN_TIMEOUT)
        ledger = latest_checkpoint(checkpoints).ledger["sites"]
        assert [h["round"] for h in ledger["site-a"]["history"]] == [1, 2, 3]
        b_rounds = [h["round"] for h in ledger["site-b"]["history"]]
        assert 1 not in b_rounds and 3 in b_rounds, deployment.logs(run_id)
        local = [
            json.loads(line) for line in (site_b.state_dir / "privacy" / "ledger.jsonl").open()
        ]
        assert [e["round"] for e in local if e["status"] == "trained"] == b_rounds
        assert (local[-1]["status"], local[-1]["round"]) == ("commit", 3)  # the final model
        assert local[-1]["epsilon"] == pytest.approx(ledger["site-b"]["epsilon"])
    finally:
        deployment.close()


def test_server_yaml_refuses_a_fresh_run_without_the_public_model_its_recipe_needs(
    tmp_path: Path, certs: Path
) -> None:
    """The ServerApp reads the starting model at round 1; a missing one, or the site-knowledge
    recipe without one, is refused when server.yaml is read: before the SuperLink starts, with
    what to do. A relative path is taken from the file's folder, as every other path."""
    train = "{dp_trainable: label-words, site_findings: unshown}"
    recipe = f"run: {{federation: {{rounds: 2}}, train: {train}}}"
    text = write_server_yaml(tmp_path / "base.yaml", certs).read_text()
    without = tmp_path / "without.yaml"
    without.write_text(re.sub(r"run: .*", recipe, text))
    with pytest.raises(ConfigError, match="needs a starting model whose public pretraining"):
        load_server_settings(without)
    resumed = tmp_path / "resumed.yaml"
    resumed.write_text(without.read_text() + "resume: true\n")
    # a resumed run starts from its own checkpoint, not the public model
    assert load_server_settings(resumed).run.train.site_findings == "unshown"
    missing = tmp_path / "missing.yaml"
    missing.write_text(
        without.read_text().replace("rounds: 2}", "rounds: 2, initial_model: public.pt}")
    )
    with pytest.raises(ConfigError, match=r"public.pt does not exist; make .*`emixer pretrain"):
        load_server_settings(missing)
    (tmp_path / "public.pt").write_bytes(b"")  # the ServerApp checks what it holds
    start = load_server_settings(missing).run.federation.initial_model
    assert start == str(tmp_path / "public.pt")


def test_compose_keeps_each_site_key_in_that_site_volume_only() -> None:
    import yaml

    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    assert services["certs"]["command"].split() == ["/src/deploy/make-certs.sh", "/certs"]
    for site in ("a", "b"):
        config = yaml.safe_load(compose["configs"][f"site_{site}_yaml"]["content"])
        assert config["private_key"].startswith("/var/lib/emixer/site/keys/")
        volume = f"hospital-{site}-state"
        holders = {n for n, s in services.items() if any(volume in v for v in s["volumes"])}
        assert holders == {f"hospital-{site}", f"hospital-{site}-keygen"}
    assert "site-keys:/site-keys:ro" in services["superlink"]["volumes"]


def test_the_shipped_server_yaml_runs_the_site_knowledge_recipe_the_bench_measured() -> None:
    """deploy/server.yaml is what a coordinator copies, and the demo runs SITE_KNOWLEDGE_TRAIN:
    both must be the recipe whose test-split figures bench/README.md publishes, or a change to
    either goes unmeasured."""
    shipped = load_yaml_as(ServerFile, ROOT / "deploy" / "server.yaml").run
    assert SITE_KNOWLEDGE_TRAIN == RECIPES["learn-unshown-lw16"]
    recipe = {key: getattr(shipped.train, key) for key in SITE_KNOWLEDGE_TRAIN}
    assert recipe == SITE_KNOWLEDGE_TRAIN
    assert shipped.federation.initial_model, "label-words and unshown need a public start"
