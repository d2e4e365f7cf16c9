"""The ledger's choice of victims: least recently used first, and none when room cannot be made."""

from __future__ import annotations

import pytest

from core.inference.residency import AdapterTooLargeError, ResidencyBusyError, choose_victims


def test_victims_are_the_least_recently_used_that_make_room() -> None:
    evictable = [("old", 3), ("mid", 3), ("new", 3)]
    assert choose_victims(evictable, held=9, nbytes=5, budget=10) == ["old", "mid"]
    assert choose_victims(evictable, held=9, nbytes=4, budget=10) == ["old"]
    assert choose_victims(evictable, held=6, nbytes=4, budget=10) == []


def test_nothing_is_chosen_when_evicting_every_candidate_is_not_enough() -> None:
    # 5 bytes are held by entries in use (not candidates): even with "a" gone, 4 + 5 + 2 > 10.
    with pytest.raises(ResidencyBusyError, match="only 5 can be freed"):
        choose_victims([("a", 2)], held=7, nbytes=6, budget=10)


def test_an_adapter_larger_than_the_budget_can_never_fit() -> None:
    with pytest.raises(AdapterTooLargeError) as raised:
        choose_victims([], held=0, nbytes=11, budget=10)
    assert (raised.value.nbytes, raised.value.budget) == (11, 10)
