"""``eval_trigger_rate`` belongs to agents whose memory has a gated path; a GRU has none and must not be
reported as firing on every step (it was: 1.0, from ``rlmem.evaluate.greedy_episodes`` counting a default
"fired" for every step)."""

from __future__ import annotations

from rlmem.agents import build_agent
from rlmem.evaluate import evaluate_greedy

ENV = {"id": "rlmem/DelayedCue-v0", "delay": 3}


def test_no_eval_trigger_rate_for_an_agent_without_a_gated_path():
    agent = build_agent({"memory": "gru", "encoder_dim": 8, "hidden_size": 8}, ENV)
    assert agent.path_cost is None
    assert "eval_trigger_rate" not in evaluate_greedy(agent, ENV, 3, seed=0, success_threshold=1.0)


def test_an_agent_with_a_gated_path_still_reports_it():
    agent = build_agent({"memory": "infinity", "encoder_dim": 16, "d_model": 16, "n_heads": 2, "mem_slots": 8,
                         "d_state": 4}, ENV, {"policy": "never"})
    assert evaluate_greedy(agent, ENV, 3, seed=0, success_threshold=1.0)["eval_trigger_rate"] == 0.0
