"""Server building blocks: update validation, the privacy ledger and checkpoints."""

from unittest.mock import MagicMock

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from emixer_model.privacy.accounting import SiteAccountant
from emixer_model.privacy.ledger import (
    LedgerRefused,
    SiteKey,
    arrays_sha256,
    status_entry,
    verify_ledger,
    verify_site_history,
)
from server.checkpoint import (
    Checkpoint,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from server.ledger import PrivacyLedger
from server.validation import update_problem
from tests.conftest import signed_round

GLOBAL = {"a.weight": np.zeros((3, 2), np.float32), "b.bias": np.ones(4, np.float32)}


def site_update(**changes):
    update = {k: v.copy() for k, v in GLOBAL.items()}
    update.update(changes)
    return update


def test_a_good_update_passes():
    update = site_update(**{"b.bias": np.full(4, 1.5, np.float32)})
    assert update_problem(GLOBAL, update, max_norm=10) is None


@pytest.mark.parametrize(
    ("update", "needle"),
    [
        (site_update(**{"a.weight": np.full((3, 2), np.nan, np.float32)}), "NaN"),
        (site_update(**{"a.weight": np.full((3, 2), np.inf, np.float32)}), "infinite"),
        (site_update(**{"a.weight": np.zeros((2, 3), np.float32)}), "expected float32[3, 2]"),
        (site_update(**{"a.weight": np.zeros((3, 2), np.float64)}), "float64"),
        (site_update(**{"a.weight": np.full((3, 2), 100.0, np.float32)}), "exceeds the bound"),
        ({"a.weight": GLOBAL["a.weight"]}, "missing ['b.bias']"),
        (site_update(**{"c": np.zeros(1, np.float32)}), "extra ['c']"),
    ],
)
def test_bad_updates_are_rejected_with_a_reason(update, needle):
    problem = update_problem(GLOBAL, update, max_norm=10.0)
    assert problem is not None and needle in problem


def metrics(epsilon, steps=5):
    return {
        "epsilon": epsilon,
        "delta": 1e-3,
        "epsilon-budget": 8.0,
        "max-grad-norm": 1.0,
        "noise-multiplier": 1.1,
        "sample-rate": 0.25,
        "steps": steps,
        "per-patient": 1.0,
        "loss-report": 2.5,
    }


def test_ledger_keeps_signed_entries_and_release_epsilon_is_the_max():
    keys = {name: SiteKey(ec.generate_private_key(ec.SECP256R1())) for name in ("s1", "s2")}
    spent = {name: SiteAccountant() for name in keys}
    model = {"w": np.zeros(2, np.float32)}

    def signed(name, server_round, seq, steps=5):
        return signed_round(keys[name], name, server_round, model, spent[name], seq, steps=steps)

    ledger = PrivacyLedger()
    sha = arrays_sha256(model)
    ledger.record("s1", 1, "trained", metrics(0), signed("s1", 1, 1), sha)
    ledger.record("s2", 1, "trained", metrics(0), signed("s2", 1, 1, steps=20), sha)
    ledger.record("s1", 2, "trained", metrics(0), signed("s1", 2, 2), sha)
    ledger.record("s1", 3, "budget-exhausted", metrics(0))
    assert ledger.release_epsilon() == spent["s2"].epsilon(1e-3)
    s1 = ledger.sites["s1"]
    assert [e["round"] for e in s1.entries()] == [1, 2]  # the refused round adds no entry
    assert s1.status == "budget-exhausted"
    assert s1.losses == [
        {"round": 1, "losses": {"report": 2.5}},
        {"round": 2, "losses": {"report": 2.5}},
    ]
    assert PrivacyLedger.from_dict(ledger.to_dict()) == ledger
    with pytest.raises(ValueError, match="different key"):  # another site's entry replayed as s1's
        ledger.record("s1", 1, "trained", metrics(0), signed("s2", 1, 2), sha)


def test_every_enrolled_site_must_sign_and_one_that_only_refused_says_so():
    """#17 hole 6: a ledger with one enrolled site removed is refused, naming it; a site that
    never trained appears through the refusal it signed, with what it has spent (nothing)."""
    keys = {name: SiteKey(ec.generate_private_key(ec.SECP256R1())) for name in ("s1", "s2")}
    model = {"w": np.zeros(2, np.float32)}
    sha = arrays_sha256(model)
    ledger, spent, final = PrivacyLedger(), SiteAccountant(), {"w": np.ones(2, np.float32)}
    trained = signed_round(keys["s1"], "s1", 1, model, spent, seq=1)
    ledger.record("s1", 1, "trained", metrics(0), trained, sha)
    commit = status_entry(
        site="s1",
        run="1",
        server_round=1,
        seq=2,
        status="commit",
        accountant=spent,
        delta=1e-3,
        model_sha256=arrays_sha256(final),
        budget=5.0,
    )
    signed_commit = {**keys["s1"].sign(commit), "public-key": keys["s1"].public_key()}
    ledger.record_commit("s1", 1, signed_commit, arrays_sha256(final))
    refusal = status_entry(
        site="s2",
        run="1",
        server_round=1,
        seq=1,
        status="budget-exhausted",
        accountant=SiteAccountant(),
        delta=None,
        model_sha256=sha,
        budget=5.0,
    )
    signed = {**keys["s2"].sign(refusal), "public-key": keys["s2"].public_key()}
    ledger.record("s2", 1, "budget-exhausted", metrics(0), signed, sha)
    ledger.record_round(1, sha, ["s1"])
    enrolled = {name: key.public_key() for name, key in keys.items()}
    verified = verify_ledger(ledger.to_dict(), 1, None, enrolled, arrays_sha256(final))
    assert verified["s2"]["epsilon"] == 0.0 and verified["s2"]["status"] == "budget-exhausted"
    dropped = ledger.to_dict()
    del dropped["sites"]["s2"]
    with pytest.raises(LedgerRefused, match="enrolled site s2 signed no entry"):
        verify_ledger(dropped, 1, None, enrolled, arrays_sha256(final))
    with pytest.raises(ValueError, match="status budget-exhausted"):  # not as trained
        ledger.record("s2", 1, "trained", metrics(0), signed, sha)


def checkpoint(k):
    return Checkpoint(k, site_update(**{"b.bias": np.full(4, k, np.float32)}), {"sites": {}}, {})


def test_checkpoints_round_trip_and_latest_skips_a_damaged_file(tmp_path):
    save_checkpoint(tmp_path, checkpoint(1))
    path2 = save_checkpoint(tmp_path, checkpoint(2))
    assert latest_checkpoint(tmp_path).server_round == 2
    path2.write_bytes(path2.read_bytes()[:100])  # a crash mid-copy, a disk error
    latest = latest_checkpoint(tmp_path)
    assert latest.server_round == 1
    np.testing.assert_array_equal(latest.arrays["b.bias"], np.full(4, 1, np.float32))
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(path2)
    assert not list(tmp_path.glob("*.tmp"))


def test_loading_a_missing_or_foreign_file_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "x.pt").write_text("hello")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "x.pt")


def test_a_lost_reply_leaves_a_gap_in_numbers_but_never_in_the_signed_history():
    key = SiteKey(ec.generate_private_key(ec.SECP256R1()))
    accountant, model = SiteAccountant(), {"w": np.zeros(2, np.float32)}
    first = signed_round(key, "s1", 1, model, accountant, seq=1)
    signed_round(key, "s1", 2, model, accountant, seq=2)  # trained, but the reply never arrived
    third = signed_round(key, "s1", 3, model, accountant, seq=3, noise_multiplier=2.0)
    entries = verify_site_history("s1", [first, third], key.public_key())
    assert entries[-1]["epsilon"] == accountant.epsilon(1e-3)  # every step is still counted
    with pytest.raises(ValueError, match="numbered 1 after 3"):
        verify_site_history("s1", [third, first], key.public_key())
    shrunk = SiteAccountant()  # a history that forgets the earlier rounds, even if signed
    forged = signed_round(key, "s1", 4, model, shrunk, seq=4, noise_multiplier=2.0)
    with pytest.raises(ValueError, match="does not extend"):
        verify_site_history("s1", [first, third, forged], key.public_key())


def test_a_checkpoint_trained_on_sites_cannot_start_a_run_as_pretrained(tmp_path):
    """#17 hole 2: `initial_model` takes only the public model its pretraining record names; a
    pretrained checkpoint trained on since (ledger stripped) no longer matches that record."""
    from emixer_model.config import FINDINGS
    from emixer_model.networks import build_networks, get_weights
    from emixer_model.text.vocabulary import VOCAB_SIZE
    from server.app import initial_model
    from tests.conftest import tiny_config

    cfg = tiny_config()
    arrays = get_weights(build_networks(cfg.model, VOCAB_SIZE, len(FINDINGS)))
    source = {"name": "public", "model_sha256": arrays_sha256(arrays)}
    pretrained = Checkpoint(0, arrays, {"sites": {}}, cfg.to_dict(), public_source=source)
    path = save_checkpoint(tmp_path / "public", pretrained)
    start = tiny_config(federation={"initial_model": str(path)})
    assert initial_model(start)[1] == source
    trained = {name: value + 0.01 for name, value in arrays.items()}  # trained, ledger stripped
    path = save_checkpoint(tmp_path / "trained", Checkpoint(0, trained, {}, {}, {}, source))
    with pytest.raises(ValueError, match="cannot pass as pretrained"):
        initial_model(tiny_config(federation={"initial_model": str(path)}))


def test_site_findings_unshown_sends_the_sites_what_the_public_model_never_saw(
    tmp_path, monkeypatch
):
    """#16: with train.site_findings "unshown" the server sends the sites, in its place, the
    findings its starting model's public pretraining never showed; a list the config names and
    "" (every finding) reach the sites as written; "unshown" without such a record is refused."""
    import server.app
    from emixer_model.config import FINDINGS, ConfigError, EmixerConfig
    from emixer_model.networks import build_networks, get_weights
    from emixer_model.public_pretrain import with_site_findings
    from emixer_model.text.vocabulary import VOCAB_SIZE
    from tests.conftest import tiny_config

    arrays = get_weights(build_networks(tiny_config().model, VOCAB_SIZE, len(FINDINGS)))
    source = {
        "model_sha256": arrays_sha256(arrays),
        "unshown_findings": ["Pneumoperitoneum", "Edema"],
    }
    path = save_checkpoint(
        tmp_path / "public", Checkpoint(0, arrays, {"sites": {}}, {}, {}, source)
    )
    strategy = MagicMock()  # stands in for the strategy: keeps the run config the sites get
    monkeypatch.setattr(server.app, "make_strategy", lambda *args: strategy)
    federation = {"initial_model": str(path), "checkpoint_dir": str(tmp_path / "ckpt")}
    for named in ("unshown", "", "Cardiomegaly"):
        train = {"dp_trainable": "label-words", "site_findings": named}
        server.app.serve(None, tiny_config(federation=federation, train=train))
    sent = [
        EmixerConfig.from_run_config(dict(call.kwargs["train_config"])).train.site_findings
        for call in strategy.start.call_args_list
    ]
    assert sent == ["Pneumoperitoneum,Edema", "", "Cardiomegaly"]
    unshown = tiny_config(train={"dp_trainable": "label-words", "site_findings": "unshown"})
    with pytest.raises(ConfigError, match="needs a starting model"):
        with_site_findings(unshown, [])
