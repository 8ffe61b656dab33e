"""A host's training slots: lock files that every process on the host sees, taken all or none."""

import threading

import pytest

from llmops.training import host_slots, training_slot


@pytest.fixture(autouse=True)
def file_slots_alone(monkeypatch):
    """These tests are about the lock files: a Prefect API that another test started (the session's test
    harness) must not add its own per-host limit, which outlives each test."""
    monkeypatch.setattr("llmops.registry.prefect_api_configured", lambda: False)


def hold_in_background(lock_dir, slots: int, needed: int) -> tuple[threading.Event, threading.Event, threading.Thread]:
    """Take `needed` of `slots` in a thread; returns (taken, release, thread)."""
    taken, release = threading.Event(), threading.Event()

    def hold():
        with training_slot(slots, needed, lock_dir):
            taken.set()
            release.wait(60)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    return taken, release, thread


def test_one_slot_per_cpu_host_unless_configured():
    assert host_slots(3) == 3
    if not __import__("torch").cuda.is_available():
        assert host_slots(None) == 1


def test_a_training_waits_while_the_slots_are_taken_and_goes_when_one_is_freed(tmp_path):
    first, release_first, _ = hold_in_background(tmp_path, slots=2, needed=1)
    second, release_second, _ = hold_in_background(tmp_path, slots=2, needed=1)
    assert first.wait(30) and second.wait(30)  # two slots: both run
    third, release_third, _ = hold_in_background(tmp_path, slots=2, needed=1)
    assert not third.wait(2)  # both slots taken: it waits
    release_first.set()
    assert third.wait(30)  # one freed: it goes
    release_second.set(), release_third.set()


def test_slots_are_taken_all_or_none(tmp_path):
    """A training that needs both slots while one is taken holds neither while it waits, so another that
    needs one is not locked out (and two such could never each hold half of what the other needs)."""
    one, release_one, _ = hold_in_background(tmp_path, slots=2, needed=1)
    assert one.wait(30)
    both, release_both, _ = hold_in_background(tmp_path, slots=2, needed=2)
    assert not both.wait(2)
    other, release_other, _ = hold_in_background(tmp_path, slots=2, needed=1)
    assert other.wait(30) and not both.is_set()
    release_one.set(), release_other.set()
    assert both.wait(30)
    release_both.set()


@pytest.mark.parametrize(("slots", "needed", "share"), [(1, 1, 1.0), (2, 1, 0.5), (4, 2, 0.5), (2, 8, 1.0)])
def test_the_share_of_the_host(tmp_path, slots, needed, share):
    with training_slot(slots, needed, tmp_path) as got:
        assert got == share


@pytest.mark.usefixtures("prefect_harness")
def test_a_prefect_limit_smaller_than_the_ask_is_taken_whole():
    """An operator who shrinks a host's limit in the UI (or a host_slots changed since it was created) must not
    leave a training waiting for more slots than the limit has."""
    from prefect.client.orchestration import get_client

    from llmops.registry import prefect_limit

    name = "llmops-training-shrunk-host"
    with prefect_limit(name, "waiting", limit=1, occupy=1):  # created with one slot
        pass
    with prefect_limit(name, "waiting", limit=4, occupy=2), get_client(sync_client=True) as client:
        held = client.read_global_concurrency_limit_by_name(name)
        assert (held.limit, held.active_slots) == (1, 1)
