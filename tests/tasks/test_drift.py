"""The drift check on the real tiny model and tokenizer, with one epoch of fine-tuning as the champion."""

import pytest

from llmops.config import load_params
from llmops.data import read_conversations
from llmops.errors import LLMOpsError
from tasks.bootstrap import build_incoming_batch
from tasks.drift import champion_reference, detect_drift, detect_traffic_drift


@pytest.fixture(scope="module")
def champion(assets, demo_data, one_epoch_adapter, tmp_path_factory):
    """A fine-tuned model: the base never saw the chat format, so its perplexity on any chat rows is noise."""
    from llmops.config import MergeParams
    from tasks.merge import merge_adapter

    folder = tmp_path_factory.mktemp("champion") / "merged"
    return merge_adapter(MergeParams(), str(assets / "model"), one_epoch_adapter, demo_data, folder).model_dir


@pytest.fixture
def check(tmp_path, champion, params):
    def run(batch, **monitor):
        monitor_params = params.monitor.model_copy(update=monitor)
        return detect_drift(monitor_params, params.data.train, [batch], champion, tmp_path / "report")

    return run


def test_new_entities_in_new_words_are_drift_on_every_view(check, params, tmp_path):
    report = check(build_incoming_batch(params.bootstrap, tmp_path / "drifted.jsonl", drifted=True))
    assert report.drifted and report.verdict == "DRIFT"
    flagged = {c.name for c in report.checks if c.drifted}
    assert {"length_ks_p_value", "unseen_token_rate", "perplexity_ratio"} <= flagged
    assert report.plot.is_file() and report.plot.stat().st_size > 1000  # the length histogram
    assert "| unseen_token_rate |" in report.to_markdown()


def test_rows_like_the_training_data_are_not_drift(check, params, tmp_path):
    report = check(build_incoming_batch(params.bootstrap, tmp_path / "same.jsonl", drifted=False))
    assert not report.drifted, report.to_markdown()
    scores = report.scores()
    assert scores["unseen_token_rate"] == 0.0
    assert scores["length_ks_p_value"] > params.monitor.length_p_value
    assert scores["perplexity_ratio"] < params.monitor.max_perplexity_ratio


def test_thresholds_come_from_params(check, params, tmp_path):
    batch = build_incoming_batch(params.bootstrap, tmp_path / "same.jsonl", drifted=False)
    report = check(batch, max_token_divergence=1e-6)
    assert report.drifted
    assert [c.name for c in report.checks if c.drifted] == ["token_js_divergence"]


def test_too_few_rows_give_no_verdict(check, params, tmp_path):
    batch = build_incoming_batch(params.bootstrap, tmp_path / "few.jsonl", drifted=True, rows=5)
    report = check(batch)
    assert not report.drifted and report.verdict == "too few rows to judge" and report.checks == []


def test_a_malformed_batch_is_a_clear_error(check, tmp_path):
    batch = tmp_path / "bad.jsonl"
    batch.write_text('{"prompt": "x"}\n')
    with pytest.raises(LLMOpsError, match="malformed rows"):
        check(batch)


def test_unversioned_reference_falls_back_to_the_recorded_file_or_says_it_is_gone(params_file, tmp_path):
    params = load_params(params_file)
    assert champion_reference({"train": str(params.data.train)}, None) == params.data.train
    with pytest.raises(LLMOpsError, match="not versioned with DVC"):
        champion_reference({"train": str(tmp_path / "gone.jsonl")}, None)


def serve_batch(folder, batch, version: str = "1"):
    """A traffic log in which `version` was asked the batch's questions (and answered anything)."""
    from datetime import UTC, datetime

    from llmops.serving.traffic_log import TrafficLog

    log = TrafficLog(folder, sample_rate=1.0, max_bytes=10_000_000)
    for conversation in read_conversations(batch):
        messages = [turn.as_message() for turn in conversation.prompt]
        log.append(TrafficLog.new_id("chatcmpl", datetime.now(UTC)), messages, "an answer", version=version)
    return folder


def test_served_prompts_about_new_things_are_drift_and_familiar_ones_are_not(champion, params, tmp_path):
    drifted = build_incoming_batch(params.bootstrap, tmp_path / "drifted.jsonl", drifted=True)
    familiar = build_incoming_batch(params.bootstrap, tmp_path / "same.jsonl", drifted=False)

    def check(traffic, version="1"):
        return detect_traffic_drift(params.monitor, params.data.train, traffic, version, champion, tmp_path / "out")

    report = check(serve_batch(tmp_path / "drifted", drifted))
    assert report.view == "prompts" and report.drifted, report.to_markdown()
    assert report.incoming_rows == len(read_conversations(drifted))
    assert "unseen_token_rate" in {c.name for c in report.checks if c.drifted}
    assert report.scores()["perplexity_ratio"] > 1.1  # the champion finds the new questions less familiar
    assert "prompts served by version 1" in report.to_markdown()

    calm = check(serve_batch(tmp_path / "familiar", familiar))
    assert not calm.drifted and calm.scores()["unseen_token_rate"] == 0.0, calm.to_markdown()
    assert calm.scores()["perplexity_ratio"] < 1.1

    other_version = check(tmp_path / "drifted", version="2")  # nothing this version served
    assert other_version.incoming_rows == 0 and other_version.verdict == "too few rows to judge"


def test_a_drift_event_is_held_back_until_a_new_champion_batch_or_judgment(tmp_path):
    """No retrain storm: what the monitor fired for is remembered; the same again (or the same with its batch
    archived by the retrain) is held back."""
    from tasks.drift import already_fired, drift_fingerprint, remember_fired
    from tests.data.traffic_rows import judged, served, write_log

    record = tmp_path / "fired.json"
    batch = tmp_path / "incoming" / "drifted.jsonl"
    batch.parent.mkdir()
    batch.write_text('{"prompt": "a", "response": "b"}\n')
    traffic = write_log(tmp_path / "incoming" / "traffic", [served(1, "q?", "a")], [judged(1)])
    fired = drift_fingerprint("3", [batch], traffic)
    assert not already_fired(record, fired)
    remember_fired(record, fired)
    assert already_fired(record, drift_fingerprint("3", [batch], traffic))
    assert already_fired(record, drift_fingerprint("3", [], traffic))  # the retrain archived the batch
    assert not already_fired(record, drift_fingerprint("4", [], traffic))  # a new champion
    batch.write_text('{"prompt": "c", "response": "d"}\n')
    assert not already_fired(record, drift_fingerprint("3", [batch], traffic))  # a new batch
    write_log(traffic, [], [judged(1, "down", "a better answer")])
    assert not already_fired(record, drift_fingerprint("3", [], traffic))  # new judged traffic
