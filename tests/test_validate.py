"""The validation layer and the registry type: every message names the key, what was wrong and the choices."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from rlmem.registry import Registry
from rlmem.validate import check_bool, check_choice, check_float, check_int, check_keys, from_mapping, suggest


def test_numbers_name_the_key_and_say_what_was_wrong():
    with pytest.raises(ValueError, match=r"^ppo.lr must be a number, not a string, got 'abc'$"):
        check_float("ppo.lr", "abc")
    with pytest.raises(ValueError, match=r"^env.delay must be in \[1, inf\], got -1$"):
        check_int("env.delay", -1, low=1)
    with pytest.raises(ValueError, match=r"^env.delay must be an integer in \[1, inf\], got 2.5$"):
        check_int("env.delay", 2.5, low=1)
    with pytest.raises(ValueError, match=r"^env.delay must be an integer in \[1, inf\], not a string, got '5'$"):
        check_int("env.delay", "5", low=1)
    with pytest.raises(ValueError, match=r"finite number in \[0, 1\].*got nan"):
        check_float("ppo.gamma", float("nan"), low=0, high=1)
    with pytest.raises(ValueError, match="must be true or false"):
        check_bool("ppo.anneal_lr", "yes")
    assert check_int("n", np.int64(3)) == 3 and type(check_int("n", np.int64(3))) is int
    assert check_float("x", 2) == 2.0 and check_bool("b", np.bool_(True)) is True


def test_choices_and_keys_suggest_a_close_match():
    with pytest.raises(ValueError, match=r"^trigger.policy='lerned' is not a valid choice \(did you mean 'learned'\?\); "
                                         r"valid: learned, meco, never$"):
        check_choice("trigger.policy", "lerned", ["learned", "meco", "never"])
    with pytest.raises(ValueError, match=r"^env.dealy is not an option of delayed_cue \(did you mean 'delay'\?\); "
                                         r"valid: delay, n_cues$"):
        check_keys("env", {"delay": 1, "dealy": 5}, ["n_cues", "delay"], of="delayed_cue")
    with pytest.raises(ValueError, match=r"^ppo.zzz is not an option; valid: lr$"):  # nothing close: no guess
        check_keys("ppo", ["zzz"], ["lr"])
    assert suggest("CartPol-v1", ["CartPole-v1", "Acrobot-v1"]) == " (did you mean 'CartPole-v1'?)"
    assert suggest(3, ["3"]) == ""


@dataclasses.dataclass
class _Config:
    steps: int = 10
    lr: float = 1e-3
    anneal: bool = True
    name: str = "x"


def test_from_mapping_checks_every_field_by_its_type():
    cfg = from_mapping(_Config, {"steps": 5, "lr": 1, "anneal": False}, "train")
    assert cfg == _Config(steps=5, lr=1.0, anneal=False) and isinstance(cfg.lr, float)
    with pytest.raises(ValueError, match=r"^train.step is not an option \(did you mean 'steps'\?\)"):
        from_mapping(_Config, {"step": 5}, "train")
    with pytest.raises(ValueError, match=r"^train.steps must be an integer"):
        from_mapping(_Config, {"steps": 5.5}, "train")
    with pytest.raises(ValueError, match=r"^train.lr must be a number, not a string"):
        from_mapping(_Config, {"lr": "fast"}, "train")
    with pytest.raises(ValueError, match=r"^train.anneal must be true or false"):
        from_mapping(_Config, {"anneal": 1}, "train")


def test_registry_names_the_choices_and_refuses_a_taken_name():
    things: Registry[object] = Registry("widget", "agent.widget")

    @things.register("spinner")
    class Spinner:
        pass

    things.add("spinner", Spinner)  # the same object again is fine
    with pytest.raises(ValueError, match="widget 'spinner' is already registered to"):
        things.add("spinner", object())
    assert things.get("spinner") is Spinner and "spinner" in things and list(things) == ["spinner"]
    with pytest.raises(KeyError, match=r"agent.widget='spiner' is not a widget \(did you mean 'spinner'\?\); "
                                       r"valid choices: spinner"):
        things.get("spiner")
    with pytest.raises(KeyError, match="valid choices: spinner"):
        things.get(["unhashable"])
    assert ["unhashable"] not in things
