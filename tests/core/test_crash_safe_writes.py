"""Saves survive kill -9 and a full disk (see tests/fuzz/crash.py; more trials:
benchmarks/crash_writes.py)."""
import random

import pytest

from studio.core.errors import StudioError
from studio.core.files import atomic_dir, remove_stale_temporaries, write_text_atomic
from tests.fuzz.crash import (KILL_WITHIN, PHASES, Savers, disk_full_trial, generation_of,
                              kill_trial, phase_trial, save, temporaries)

TRIALS = 6


@pytest.fixture(scope="module")
def savers():
    savers = Savers()
    yield savers
    savers.close()


@pytest.mark.parametrize("kind", ["variant", "plan", "session", "export"])
def test_kill_9_during_saves_leaves_one_complete_generation(tmp_path, kind, savers):
    target = tmp_path / ("plan.json" if kind == "plan" else kind)
    rng = random.Random(kind)
    trials = TRIALS if kind != "export" else 2   # (an export takes seconds)
    outcomes = [kill_trial(savers, kind, target, rng.uniform(0.0, KILL_WITHIN.get(kind, 0.5)))
                for _ in range(trials)]
    assert all(o["generation"] >= 1 for o in outcomes)  # never missing, never mixed
    assert all(o["after_next_save"] == 0 for o in outcomes), outcomes


@pytest.mark.parametrize("kind,phase", list(PHASES))
def test_kill_9_at_each_phase_of_a_save(tmp_path, kind, phase, savers):
    """Random kills mostly land while a save prepares its data; these land, for certain, in
    each step of the write itself."""
    target = tmp_path / ("plan.json" if kind == "plan" else kind)
    outcome = phase_trial(savers, kind, phase, target)
    assert outcome["status"] == -9, outcome  # the saver was killed where intended
    assert outcome["generation"] == PHASES[kind, phase], outcome
    assert outcome["after_next_save"] == 0, outcome
    if phase in ("writing", "before-swap", "after-swap", "before-rename"):
        assert outcome["leftovers"] > 0, outcome  # something was left for the next save


@pytest.mark.parametrize("kind,limit", [("variant", 100_000), ("plan", 4096),
                                        ("session", 100_000), ("export", 20_000)])
def test_disk_full_is_a_clear_error_and_loses_nothing(tmp_path, kind, limit, savers):
    target = tmp_path / ("plan.json" if kind == "plan" else kind)
    save(kind, target, 5)
    status, output = disk_full_trial(savers, kind, target, limit)
    assert status == 2, output
    assert "disk is full" in output and str(target) in output
    assert generation_of(kind, target) == 5
    assert temporaries(target) == []


def test_a_killed_writers_temporaries_go_but_a_live_writers_stay(tmp_path):
    target = tmp_path / "plan.json"
    dead = tmp_path / ".plan.json.999999999-abc.tmp"   # no such process
    old_style = tmp_path / ".plan.json.abc.tmp"
    live = tmp_path / f".plan.json.{1}-abc.tmp"        # pid 1 is always alive
    for path in (dead, old_style, live):
        path.write_text("partial")
    write_text_atomic(target, "{}")
    assert not dead.exists() and not old_style.exists() and live.exists()
    assert target.read_text() == "{}"


def test_the_fallback_swap_is_recovered_when_killed_between_renames(tmp_path):
    """Where renameat2 is missing the swap is two renames; a kill between them leaves the old
    folder at .NAME.old, which the next save puts back before anything else."""
    target = tmp_path / "variant"
    old = tmp_path / ".variant.old"
    old.mkdir()
    (old / "variant.json").write_text("old")
    remove_stale_temporaries(target)
    assert (target / "variant.json").read_text() == "old" and not old.exists()


def test_atomic_dir_replaces_an_existing_folder_in_one_step(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("2")
        assert (target / "a").read_text() == "1"  # untouched until the end
    assert (target / "a").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "a").write_text("3")
            raise RuntimeError("cancelled")
    assert (target / "a").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_disk_errors_are_studio_errors():
    import errno

    from studio.core.files import disk_error

    assert isinstance(disk_error(OSError(errno.ENOSPC, "No space left on device"), "x"),
                      StudioError)
    assert isinstance(disk_error(Exception("I/O error: File too large (os error 27)"), "x"),
                      StudioError)
    other = OSError(errno.EACCES, "Permission denied")
    assert disk_error(other, "x") is other
