"""Ingest against a real DVC repository in a temporary git repo."""

import pytest

from llmops.config import load_params
from llmops.data import Conversation, read_conversations, split_files, split_md5, tracked_version
from llmops.errors import LLMOpsError
from tasks.ingest import ingest_dataset
from tasks.validate import InvalidData
from tests.conftest import make_dvc_project, write_params
from tests.data.bad_datasets import BAD_DATASETS, GOOD_ROWS, jsonl

NEW_ROWS = [{"prompt": f"What color is the zebra number {i}?", "response": "silver"} for i in range(12)]


@pytest.fixture
def project(tmp_path, assets):
    params = load_params(make_dvc_project(tmp_path, assets))
    return params, tmp_path


def contents(split):
    """Every file of a folder split, by name."""
    return {f.name: f.read_bytes() for f in split_files(split)}


def ingest(params, new, mode="append", archive=False, max_seq_len=None, excess_length="drop"):
    return ingest_dataset(
        params.validate_,
        params.model.base,
        max_seq_len or params.finetune.max_seq_len,
        new,
        params.data.train,
        params.data.eval,
        mode,
        archive=archive,
        excess_length=excess_length,
    )


def test_good_rows_are_appended_versioned_and_pushed(project):
    params, root = project
    new = root / "new.jsonl"
    new.write_bytes(jsonl(NEW_ROWS))
    before_rows, before_files = len(read_conversations(params.data.train)), contents(params.data.train)
    _, before = tracked_version(params.data.train)

    result = ingest(params, new)
    assert result.previous_version == before and result.version != before
    assert result.rows_after == before_rows + len(NEW_ROWS)
    # The batch's prompt/response rows join the chat-shaped training set as conversations.
    assert read_conversations(params.data.train)[-1] == Conversation.from_pair(**NEW_ROWS[-1])
    assert tracked_version(params.data.train)[1] == result.version
    # The split's own file is untouched: the batch landed as a file of its own, its bytes as given.
    after = contents(params.data.train)
    [added] = set(after) - set(before_files)
    assert added.startswith("ingested-") and after[added] == new.read_bytes()
    assert {name: after[name] for name in before_files} == before_files
    # Pushed: the new version's folder listing is in the remote.
    digest = result.version.removesuffix(".dir")
    assert list((root / "dvc-storage").rglob(f"{digest[2:]}.dir"))
    assert not list(root.rglob(".ingest-*"))  # no temporary file left behind


def test_replace_mode_swaps_the_training_set(project):
    params, root = project
    new = root / "new.jsonl"
    new.write_bytes(jsonl(NEW_ROWS))
    assert ingest(params, new, mode="replace").rows_after == len(NEW_ROWS)
    assert list(contents(params.data.train).values()) == [new.read_bytes()]


@pytest.mark.parametrize("kind", ["line not JSON", "private key pasted", "blank prompt", "binary file"])
def test_bad_data_changes_nothing(project, kind):
    params, root = project
    new = root / "new.jsonl"
    new.write_bytes(BAD_DATASETS[kind][0])
    before_bytes, before_version = contents(params.data.train), tracked_version(params.data.train)
    with pytest.raises(InvalidData):
        ingest(params, new)
    assert contents(params.data.train) == before_bytes
    assert tracked_version(params.data.train) == before_version


def test_rows_that_would_leak_or_duplicate_are_refused(project):
    params, root = project
    existing = split_files(params.data.train)[0].read_text().splitlines()[:12]
    duplicates = root / "dup.jsonl"
    duplicates.write_text("\n".join(existing) + "\n")
    md5 = split_md5(params.data.train)
    with pytest.raises(InvalidData, match="duplicate rows"):
        ingest(params, duplicates)
    leaking = root / "leak.jsonl"
    leaking.write_bytes(b"".join(contents(params.data.eval).values()))
    with pytest.raises(InvalidData, match="leakage"):
        ingest(params, leaking)
    assert split_md5(params.data.train) == md5


def test_ingest_outside_a_dvc_repository_is_refused(tmp_path, assets):
    params = load_params(write_params(tmp_path, assets))
    new = tmp_path / "new.jsonl"
    new.write_bytes(jsonl(GOOD_ROWS))
    with pytest.raises(LLMOpsError, match="not inside a DVC repository"):
        ingest(params, new)


def test_a_folder_is_one_batch_and_is_archived_once_ingested(project):
    params, root = project
    incoming = root / "incoming"
    incoming.mkdir()
    (incoming / "a.jsonl").write_bytes(jsonl(NEW_ROWS[:6]))
    (incoming / "b.jsonl").write_bytes(jsonl(NEW_ROWS[6:]))
    before_rows = len(read_conversations(params.data.train))

    result = ingest(params, incoming, archive=True)
    assert result.rows_after == before_rows + len(NEW_ROWS)
    assert not list(incoming.glob("*.jsonl"))  # nothing left to fold in twice
    [archived] = (incoming / "ingested").iterdir()
    assert sorted(p.name for p in archived.iterdir()) == ["a.jsonl", "b.jsonl"]


def test_a_bad_file_in_a_folder_rejects_the_whole_batch_and_moves_nothing(project):
    params, root = project
    incoming = root / "incoming"
    incoming.mkdir()
    (incoming / "a.jsonl").write_bytes(jsonl(NEW_ROWS))
    (incoming / "b.jsonl").write_bytes(b'{"prompt": "no response"}\n')
    before = contents(params.data.train)

    with pytest.raises(InvalidData, match="missing field"):
        ingest(params, incoming, archive=True)
    assert contents(params.data.train) == before
    assert sorted(p.name for p in incoming.iterdir()) == ["a.jsonl", "b.jsonl"]


def test_a_batch_of_long_prompts_is_refused_when_dropped_and_taken_when_truncated(project):
    params, root = project
    long_rows = [
        {"prompt": f"Bonjour! Pouvez-vous me dire, s'il vous plait, {'vraiment ' * 30}la couleur du zebre {i}?",
         "response": "argent"}
        for i in range(12)
    ]  # fmt: skip
    new = root / "french.jsonl"
    new.write_bytes(jsonl(long_rows))
    with pytest.raises(InvalidData, match="longer than finetune.max_seq_len=64"):
        ingest(params, new, max_seq_len=64)
    result = ingest(params, new, max_seq_len=64, excess_length="truncate_prompt")
    assert result.rows_after == result.rows_before + 12


def test_ingest_reads_swaps_and_versions_under_the_dvc_lock(project):
    """While another DVC command holds the workspace's lock, an ingest waits: it neither reads nor swaps the
    training file, so two at once never lose each other's rows."""
    import threading
    import time

    from llmops.data import dvc_lock, dvc_root

    params, root = project
    new = root / "new.jsonl"
    new.write_bytes(jsonl(NEW_ROWS))
    before = contents(params.data.train)
    outcome = {}
    with dvc_lock(dvc_root(params.data.train)):
        thread = threading.Thread(target=lambda: outcome.setdefault("result", ingest(params, new)))
        thread.start()
        time.sleep(3)
        assert thread.is_alive() and contents(params.data.train) == before
    thread.join(timeout=300)
    assert outcome["result"].rows_after == len(b"".join(before.values()).splitlines()) + len(NEW_ROWS)


def test_judged_traffic_is_folded_in_once_beside_a_batch_and_unjudged_answers_never(project):
    from datetime import UTC, datetime

    from llmops.traffic import TrafficLog

    params, root = project
    incoming = root / "incoming"
    log = TrafficLog(incoming / "traffic", sample_rate=1.0, max_bytes=100_000)
    served = {}
    for row in NEW_ROWS:  # the model answered every question wrong
        served[row["prompt"]] = TrafficLog.new_id("chatcmpl", datetime.now(UTC))
        log.append(served[row["prompt"]], [{"role": "user", "content": row["prompt"]}], "gold", version="1")
    for row in NEW_ROWS[:4]:
        assert log.feedback(served[row["prompt"]], "down", row["response"])  # corrected: the correction trains
    for row in NEW_ROWS[4:6]:
        assert log.feedback(served[row["prompt"]], "up", None)  # approved: the model's answer trains
    assert log.feedback(served[NEW_ROWS[6]["prompt"]], "down", None)  # rejected, no correction: left out
    batch = [{"prompt": f"What color is the okapi number {i}?", "response": "brown"} for i in range(10)]
    (incoming / "batch.jsonl").write_bytes(jsonl(batch))  # prompt/response rows beside the chat-shaped traffic
    before = read_conversations(params.data.train)

    result = ingest(params, incoming, archive=True)
    assert (result.traffic.folded, result.traffic.left_out, result.traffic.duplicates) == (6, 6, 0)
    added = read_conversations(params.data.train)[len(before) :]
    assert len(added) == result.rows_after - result.rows_before == len(batch) + 6
    assert {Conversation.from_pair(r["prompt"], r["response"]) for r in NEW_ROWS[:4]} <= set(added)
    assert {Conversation.from_pair(r["prompt"], "gold") for r in NEW_ROWS[4:6]} <= set(added)
    assert not {c.last_user for c in added} & {r["prompt"] for r in NEW_ROWS[6:]}
    assert tracked_version(params.data.train)[1] == result.version
    assert not list(incoming.glob("*.jsonl")) and list((incoming / "traffic").glob("traffic-*.jsonl"))

    again = ingest(params, incoming, archive=True)  # nothing judged since: the dataset stays as it is
    assert (again.traffic.folded, again.traffic.duplicates) == (0, 6)
    assert again.version == result.version and again.rows_after == again.rows_before == result.rows_after
