"""The served-traffic log read back: the monitor's prompts and the retrain's judged rows."""

from datetime import UTC, datetime

import pytest

from llmops.data import Conversation, Turn, batch_files
from llmops.errors import LLMOpsError
from llmops.traffic import TrafficLog, judged_traffic, served_prompts, traffic_log


def serve(log: TrafficLog, question: str, answer: str, version: str = "1") -> str:
    response_id = TrafficLog.new_id("chatcmpl", datetime.now(UTC))
    assert log.append(response_id, [{"role": "user", "content": question}], answer, version=version)
    return response_id


def test_only_judged_traffic_is_fit_to_train_on(tmp_path):
    log = TrafficLog(tmp_path, sample_rate=1.0, max_bytes=100_000)
    ids = {
        name: serve(log, f"question {name}", f"answer {name}")
        for name in ("corrected", "liked", "disliked", "unjudged")
    }
    assert log.feedback(ids["corrected"], "down", "the right answer")
    assert log.feedback(ids["liked"], "up", None)
    assert log.feedback(ids["disliked"], "down", None)
    assert log.feedback(ids["disliked"], "down", None)  # judged twice: still one exchange

    judged = judged_traffic(tmp_path)
    assert (judged.folded, judged.left_out, judged.duplicates) == (2, 2, 0)
    assert set(judged.rows) == {
        Conversation.from_pair("question corrected", "the right answer"),
        Conversation.from_pair("question liked", "answer liked"),
    }


def test_the_latest_judgment_wins_and_rows_already_trained_on_are_not_folded_again(tmp_path):
    log = TrafficLog(tmp_path, sample_rate=1.0, max_bytes=100_000)
    changed_mind = serve(log, "question one", "answer one")
    assert log.feedback(changed_mind, "up", None)
    assert log.feedback(changed_mind, "down", None)
    liked = serve(log, "question two", "answer two")
    assert log.feedback(liked, "up", None)
    trained = {Conversation.from_pair("question two", "answer two").key()}

    judged = judged_traffic(tmp_path, known=trained)
    assert (judged.folded, judged.left_out, judged.duplicates) == (0, 1, 1)


def test_the_monitor_sees_only_the_prompts_one_version_was_served(tmp_path):
    log = TrafficLog(tmp_path, sample_rate=1.0, max_bytes=100_000)
    serve(log, "asked the old champion", "old answer", version="1")
    serve(log, "asked the new champion", "new answer", version="2")
    with next(tmp_path.glob("traffic-*.jsonl")).open("a") as handle:
        handle.write('{"id": "chatcmpl-cut sh')  # a row cut short by a crash: skipped, the rest still counts

    assert served_prompts(tmp_path, "2") == [(Turn("user", "asked the new champion"),)]


def test_a_traffic_log_is_found_in_the_incoming_folder_and_is_never_a_batch(tmp_path):
    log = TrafficLog(tmp_path / "traffic", sample_rate=1.0, max_bytes=100_000)
    assert traffic_log(tmp_path) is None
    serve(log, "question", "answer")
    assert traffic_log(tmp_path) == tmp_path / "traffic" == traffic_log(tmp_path / "traffic")
    assert batch_files(tmp_path / "traffic") == []  # unjudged answers never train as a batch would
    with pytest.raises(LLMOpsError, match="not a batch to train on"):
        batch_files(next((tmp_path / "traffic").glob("traffic-*.jsonl")))
