"""The strategy hooks: bad updates are dropped with a logged reason and the round still finishes
with the good ones; a site out of budget is recorded and left out; every round is checkpointed."""

import logging

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from emixer_model.config import EmixerConfig, FederationConfig
from emixer_model.privacy.accounting import SiteAccountant
from emixer_model.privacy.ledger import SiteKey, arrays_sha256
from emixer_model.records import LAYOUT, from_array_record, to_array_record, to_wire_record
from server.checkpoint import latest_checkpoint
from server.ledger import PrivacyLedger
from server.strategy import make_strategy
from tests.conftest import signed_round

GLOBAL = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield


def site_metrics(epsilon=1.0):
    return {
        "num-examples": 10.0, "epsilon": epsilon, "delta": 1e-3, "epsilon-budget": 5.0,
        "noise-multiplier": 1.0, "sample-rate": 0.2, "max-grad-norm": 1.0, "steps": 5.0,
        "trained": 1.0, "per-patient": 1.0,
    }  # fmt: skip


KEYS: dict[str, SiteKey] = {}


def reply(node, name, arrays=None, status="trained", epsilon=1.0, server_round=1, model=GLOBAL):
    request = Message(content=RecordDict(), dst_node_id=node, message_type="train")
    content = RecordDict(
        {
            "metrics": MetricRecord(site_metrics(epsilon)),
            "site": ConfigRecord({"name": name, "status": status, "message": "over budget"}),
        }
    )
    if status == "trained":
        key = KEYS.setdefault(name, SiteKey(ec.generate_private_key(ec.SECP256R1())))
        signed = signed_round(key, name, server_round, model, SiteAccountant(), seq=1)
        content["ledger"] = ConfigRecord(signed)
    if arrays is not None:
        content["arrays"] = to_wire_record(arrays)  # as client/app.py sends it
    return Message(content=content, reply_to=request)


def strategy_for(tmp_path, **federation):
    federation = {"max_update_norm": 5.0, "min_sites": 1, **federation}
    cfg = EmixerConfig(federation=FederationConfig(**federation))
    strategy = make_strategy(cfg, tmp_path, PrivacyLedger())
    strategy.global_arrays = GLOBAL
    strategy.global_sha256 = arrays_sha256(GLOBAL)
    return strategy


def test_nan_and_oversized_updates_are_dropped_and_the_round_finishes(tmp_path, caplog):
    strategy = strategy_for(tmp_path)
    good = {"w": np.ones((2, 3), np.float32), "b": np.ones(3, np.float32)}
    nan = {"w": np.full((2, 3), np.nan, np.float32), "b": np.zeros(3, np.float32)}
    huge = {"w": np.full((2, 3), 100.0, np.float32), "b": np.zeros(3, np.float32)}
    with caplog.at_level(logging.WARNING, logger="emixer.server"):
        arrays, _ = strategy.aggregate_train(
            1, [reply(1, "good", good), reply(2, "nan", nan), reply(3, "huge", huge)]
        )
    np.testing.assert_array_equal(arrays["w"].numpy(), good["w"])  # only the good one counted
    assert "update from site nan dropped: array 'w' holds NaN" in caplog.text
    assert "update from site huge dropped: update norm" in caplog.text
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.server_round == 1
    np.testing.assert_array_equal(ckpt.arrays["b"], good["b"])
    assert set(ckpt.ledger["sites"]) == {"good", "nan", "huge"}


def test_budget_exhausted_site_is_recorded_and_left_out(tmp_path):
    strategy = strategy_for(tmp_path)
    good = {"w": np.ones((2, 3), np.float32), "b": np.ones(3, np.float32)}
    arrays, _ = strategy.aggregate_train(
        1, [reply(1, "a", good), reply(2, "b", None, "budget-exhausted", epsilon=4.9)]
    )
    assert arrays is not None
    assert strategy.exhausted_nodes == {2}
    assert not strategy.stopped
    site_b = strategy.ledger.sites["b"]
    assert site_b.status == "budget-exhausted" and site_b.signed == []
    assert strategy.ledger.rounds["1"]["sites"] == ["a"]  # what the gate checks coverage against


def test_budget_exhausted_site_stops_training_when_configured(tmp_path):
    strategy = strategy_for(tmp_path, on_budget_exhausted="stop")
    strategy.aggregate_train(1, [reply(2, "b", None, "budget-exhausted")])
    assert strategy.stopped
    assert list(strategy.configure_train(2, to_array_record(GLOBAL), ConfigRecord(), None)) == []


def test_resumed_strategy_numbers_rounds_after_the_checkpoint(tmp_path):
    cfg = EmixerConfig()
    strategy = make_strategy(cfg, tmp_path, PrivacyLedger(), round_offset=2)
    strategy.global_arrays = GLOBAL
    strategy.global_sha256 = arrays_sha256(GLOBAL)
    strategy.aggregate_train(1, [reply(1, "a", GLOBAL, server_round=3)])
    assert latest_checkpoint(tmp_path).server_round == 3
    assert strategy.ledger.sites["a"].entries()[0]["round"] == 3


def test_site_error_and_malformed_metrics_are_dropped_without_crashing(tmp_path, caplog):
    strategy = strategy_for(tmp_path)
    good = {"w": np.ones((2, 3), np.float32), "b": np.ones(3, np.float32)}
    failed = reply(2, "site_b", status="error")
    malformed = reply(3, "site_c", arrays=good)
    del malformed.content["ledger"]  # trained, but no signed entry
    with caplog.at_level(logging.WARNING, logger="emixer.server"):
        arrays, _ = strategy.aggregate_train(
            1, [reply(1, "site_a", arrays=good), failed, malformed]
        )
    assert arrays is not None
    assert "site site_b did not train" in caplog.text
    assert "site site_c sent a malformed or unverifiable ledger entry" in caplog.text
    assert set(strategy.ledger.sites) == {"site_a"}


def test_an_entry_signed_for_another_model_or_with_a_changed_key_is_dropped(tmp_path, caplog):
    strategy = strategy_for(tmp_path)
    good = {"w": np.ones((2, 3), np.float32), "b": np.ones(3, np.float32)}
    replayed = reply(1, "a", good, model={"w": np.ones(1, np.float32)})
    with caplog.at_level(logging.WARNING, logger="emixer.server"):
        arrays, _ = strategy.aggregate_train(1, [replayed])
    assert arrays is None and "signed for another global model" in caplog.text
    strategy.aggregate_train(1, [reply(1, "a", good)])
    KEYS["a"] = SiteKey(ec.generate_private_key(ec.SECP256R1()))
    with caplog.at_level(logging.WARNING, logger="emixer.server"):
        strategy.aggregate_train(2, [reply(1, "a", good, server_round=2)])
    assert "signed with a different key" in caplog.text
    assert len(strategy.ledger.sites["a"].signed) == 1


def test_float16_updates_are_widened_before_aggregation_and_other_dtypes_dropped(tmp_path):
    strategy = strategy_for(tmp_path)
    half = {"w": np.full((2, 3), 0.5, np.float32), "b": np.full(3, 0.5, np.float32)}
    wrong = {"w": np.ones((2, 3), np.float64), "b": np.ones(3, np.float64)}
    small = reply(1, "site_a")
    small.content["arrays"] = to_wire_record(half, "float16")
    assert small.content["arrays"]["packed"].numpy().dtype == np.float16
    arrays, _ = strategy.aggregate_train(1, [small, reply(2, "site_b", arrays=wrong)])
    assert arrays["w"].numpy().dtype == np.float32
    np.testing.assert_allclose(arrays["w"].numpy(), 0.5)


def test_a_round_with_fewer_usable_updates_than_min_sites_leaves_the_model_as_it_was(
    tmp_path, caplog
):
    """Issue 18: a dead node still counted as available, so rounds were aggregated from one site
    with min_sites 2. Such a round changes nothing; the site's spend is still on record."""
    strategy = strategy_for(tmp_path, min_sites=2)
    good = {"w": np.ones((2, 3), np.float32), "b": np.ones(3, np.float32)}
    nan = {"w": np.full((2, 3), np.nan, np.float32), "b": np.zeros(3, np.float32)}
    with caplog.at_level(logging.WARNING, logger="emixer.server"):
        arrays, _ = strategy.aggregate_train(1, [reply(1, "a", good), reply(2, "b", nan)])
    assert arrays is None  # Flower's Strategy.start keeps the previous global model
    assert "fewer than min_sites=2; the global model stays as it was" in caplog.text
    ckpt = latest_checkpoint(tmp_path)
    np.testing.assert_array_equal(ckpt.arrays["w"], GLOBAL["w"])
    assert ckpt.ledger["rounds"]["1"]["sites"] == []  # no site's update is in the model
    assert set(ckpt.ledger["sites"]) == {"a", "b"}  # both trained: both spends are recorded
    both = strategy_for(tmp_path / "both", min_sites=2)
    assert both.aggregate_train(1, [reply(1, "c", good), reply(2, "d", good)])[0] is not None


def test_a_round_whose_replies_all_missed_the_timeout_is_still_on_record(tmp_path):
    """Found by the fault test: after the coordinator's restart both sites came back too late for
    resumed round 4, which left no record, and the release gate refused the run."""
    strategy = strategy_for(tmp_path, min_sites=2)
    arrays, _ = strategy.aggregate_train(1, [])
    assert arrays is None
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.server_round == 1 and ckpt.ledger["rounds"]["1"]["sites"] == []


def test_a_packed_update_whose_layout_does_not_fit_its_data_is_dropped_with_the_reason(
    tmp_path, caplog
):
    strategy = strategy_for(tmp_path)
    good = {"w": np.ones((2, 3), np.float32), "b": np.ones(3, np.float32)}
    short = reply(2, "short", arrays=good)
    short.content["arrays"] = to_wire_record({"w": good["w"], "b": np.ones(2, np.float32)})
    short.content["arrays"][LAYOUT] = to_wire_record(good)[LAYOUT]  # claims 9 values, holds 8
    garbled = reply(3, "garbled", arrays=good)
    garbled.content["arrays"][LAYOUT] = to_array_record({"x": np.ones(4, np.uint8)})["x"]
    with caplog.at_level(logging.WARNING, logger="emixer.server"):
        arrays, _ = strategy.aggregate_train(1, [reply(1, "good", good), short, garbled])
    np.testing.assert_array_equal(arrays["w"].numpy(), good["w"])
    assert "update from site short dropped: the packed model's layout (2 arrays, 9 values) " \
        "does not fit its data (8 values)" in caplog.text  # fmt: skip
    assert (
        "update from site garbled dropped: the packed model's layout is unreadable" in caplog.text
    )


def test_the_server_sends_each_site_the_global_model_packed_as_one_array(tmp_path):
    class Grid:
        def get_node_ids(self):
            return [1, 2]

        def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
            return Message(content=content, dst_node_id=dst_node_id, message_type=message_type)

    strategy = strategy_for(tmp_path)
    weights = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}
    sent = list(strategy.configure_train(1, to_array_record(weights), ConfigRecord(), Grid()))
    assert sorted(m.metadata.dst_node_id for m in sent) == [1, 2]
    for message in sent:
        assert set(message.content["arrays"]) == {"packed", LAYOUT}
        received = from_array_record(message.content["arrays"])
        assert list(received) == ["w", "b"]
        np.testing.assert_array_equal(received["w"], weights["w"])
