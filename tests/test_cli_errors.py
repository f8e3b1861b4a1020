"""Typos and bad values on the command line: one line on stderr naming the wrong word, the valid choices and
a "did you mean", exit code 2, before Hydra prints anything. In-process: each command's ``main(argv)``."""

from __future__ import annotations

import pytest

from rlmem.commands import benchmark, evaluate, train_lm, train_rl
from rlmem.commands.overrides import check_overrides

ENVS = ("assoc_recall, autoencode, babi, cartpole, copy_memory, count_recall, delayed_cue, gym, induction_head, "
        "memory_length, pendulum, position_only_cartpole, position_only_pendulum, repeat_first, repeat_previous, "
        "selective_copy, tmaze_active, tmaze_passive")
AGENTS = "adapter, armt, armt_unified, cmrn, darmt, gru, infinity, lstm, mamba, mlp, ot, ssm, stm, transformer"
MODELS = "adapter, armt, armt_unified, cmrn, darmt, gru, infinity, lstm, mamba, mlp, ssm, stm, transformer"
TASKS = "assoc_recall, babi, copy_memory, induction_head, selective_copy"
PPO = ("anneal_lr, clip_epsilon, entropy_coef, epochs, eval_episodes, eval_interval, gae_lambda, gamma, lr, "
       "max_grad_norm, minibatches, normalize_advantage, normalize_reward, num_envs, rollout_len, seq_len, value_coef")
DARMT = ("correction, d_ff, d_mem, d_model, encoder_dim, eps, freeze_armt, gate_bias, memory, n_coproc_layers, n_heads, "
         "n_layers, num_latents, num_mem_tokens, residual, rule, segment_len, use_learned_fusion")


def one_line_error(main, args, capsys) -> str:
    """The command's stderr, asserted to be one line, after exit code 2."""
    with pytest.raises(SystemExit) as stop:
        main(args)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.mark.parametrize("main, args, expected", [
    (train_rl.main, ["agent=gruu"], ("train_rl: invalid configuration: agent='gruu' is not a config of "
     f"rlmem/conf/agent/ (did you mean 'gru'?); valid: {AGENTS}")),
    (train_rl.main, ["env=delayd_cue"], ("train_rl: invalid configuration: env='delayd_cue' is not a config of "
     f"rlmem/conf/env/ (did you mean 'delayed_cue'?); valid: {ENVS}")),
    (train_rl.main, ["agent=infinity", "trigger=lerned"], ("train_rl: invalid configuration: trigger='lerned' is not "
     "a config of rlmem/conf/trigger/ (did you mean 'learned'?); valid: always, ars, learned, meco, never")),
    (train_rl.main, ["collector=proces"], ("train_rl: invalid configuration: collector='proces' is not a config of "
     "rlmem/conf/collector/ (did you mean 'process'?); valid: process, ray, sync")),
    (train_rl.main, ["-m", "agent=gru,lstmm"], ("train_rl: invalid configuration: agent='lstmm' is not a config of "
     f"rlmem/conf/agent/ (did you mean 'lstm'?); valid: {AGENTS}")),
    (train_lm.main, ["task=copy_mem"], ("train_lm: invalid configuration: task='copy_mem' is not a config of "
     f"rlmem/conf/task/ (did you mean 'copy_memory'?); valid: {TASKS}")),
    (train_lm.main, ["model=gruu"], ("train_lm: invalid configuration: model='gruu' is not a config of "
     f"rlmem/conf/model/ (did you mean 'gru'?); valid: {MODELS}")),
    (benchmark.main, ["suite=smok"], ("benchmark: invalid configuration: suite='smok' is not a config of "
     "rlmem/conf/suite/ (did you mean 'smoke'?); valid: all, collectors, horizon, leaderboard, lm, pareto, popgym, reward_scales, "
     "smoke")),
])
def test_a_wrong_config_name_is_one_line_with_the_choices(main, args, expected, capsys):
    assert one_line_error(main, args, capsys) == expected


@pytest.mark.parametrize("main, args, expected", [
    (train_rl.main, ["env.dealy=5"], ("env.dealy is not an option of env=delayed_cue (did you mean 'delay'?); "
     "valid: delay, difficulty, id, n_cues, noise")),
    (train_rl.main, ["+env.dealy=5"], ("env.dealy is not an option of env=delayed_cue (did you mean 'delay'?); "
     "valid: delay, difficulty, id, n_cues, noise")),
    (train_rl.main, ["env=tmaze_passive", "env.corridor_lenght=3"], ("env.corridor_lenght is not an option of "
     "env=tmaze_passive (did you mean 'corridor_length'?); valid: corridor_length, difficulty, goal_reward, id, penalty")),
    (train_rl.main, ["agent.hidden_sise=64"], ("agent.hidden_sise is not an option of agent=gru (did you mean "
     "'hidden_size'?); valid: encoder_dim, hidden_size, memory")),
    (train_rl.main, ["agent=darmt", "agent.segment_lem=4"], ("agent.segment_lem is not an option of agent=darmt "
     f"(did you mean 'segment_len'?); valid: {DARMT}")),
    (train_rl.main, ["ppo.lrr=0.1"], f"ppo.lrr is not an option of ppo=default (did you mean 'lr'?); valid: {PPO}"),
    (train_rl.main, ["agent=infinity", "trigger=learned", "trigger.cost_cof=1"], ("trigger.cost_cof is not an option "
     "of trigger=learned (did you mean 'cost_coef'?); valid: cost, cost_coef, cost_warmup, init_bias, policy")),
    (train_rl.main, ["trigger=always", "trigger.init_bias=1"],
     "trigger.init_bias is not an option of trigger=always; valid: cost, cost_coef, cost_warmup, policy"),
    (train_rl.main, ["collector=process", "collector.num_worker=2"], ("collector.num_worker is not an option of "
     "collector=process (did you mean 'num_workers'?); valid: num_workers, type")),
    (train_rl.main, ["total_frame=100"], ("total_frame is not an option of train_rl (did you mean 'total_frames'?); "
     "valid: agent, collector, compile, device, env, imports, logger, ppo, resume, seed, threads, total_frames, "
     "trigger (config groups: agent, env, trigger, ppo, logger, collector)")),
    (train_lm.main, ["model.hidden_sise=8"], ("model.hidden_sise is not an option of model=gru (did you mean "
     "'hidden_size'?); valid: d_model, hidden_size, memory")),
    (train_lm.main, ["task.n_item=3"], ("task.n_item is not an option of task=copy_memory (did you mean "
     "'n_items'?); valid: delay, n_items, name, vocab_size")),
    (evaluate.main, ["checkpoint=x", "episode=3"], ("episode is not an option of evaluate (did you mean "
     "'episodes'?)")),
])
def test_an_unknown_knob_is_one_line_with_the_valid_knobs(main, args, expected, capsys):
    err = one_line_error(main, args, capsys)
    assert err.split(": invalid configuration: ", 1)[1].startswith(expected), err


def test_a_mistyped_gymnasium_id_suggests_the_registered_one(capsys):
    err = one_line_error(train_rl.main, ["env=gym", "env.id=CartPol-v1"], capsys)
    assert err.startswith("train_rl: invalid configuration: env.id='CartPol-v1' is not a registered Gymnasium id "
                          "(did you mean 'CartPole-v1'?); valid: rlmem/AssocRecall-v0, ")
    assert "rlmem/DelayedCue-v0" in err and "or 'my_module:MyEnv-v0' to import the module that registers it" in err


@pytest.mark.parametrize("args, expected", [
    (["env.delay=-1"], "train_rl: invalid configuration: env.delay must be in [0, inf], got -1"),
    (["ppo.lr=abc"], "train_rl: invalid configuration: ppo.lr must be a number, not a string, got 'abc'"),
])
def test_a_bad_value_names_its_key_end_to_end(args, expected, tmp_path, capsys):
    assert one_line_error(train_rl.main, [*args, f"hydra.run.dir={tmp_path}"], capsys) == expected
    assert not (tmp_path / "metrics.json").exists()


def test_valid_knobs_pass_and_unlisted_ones_need_no_plus():
    """A constructor argument the yaml leaves out is still a knob: it becomes ``++key=value`` for Hydra."""
    args = ["agent=gru", "agent.hidden_size=8", "env.delay=3", "ppo.lr=0.1", "seed=1", "hydra.run.dir=x", "-m"]
    assert check_overrides("train_rl", args) == args
    assert check_overrides("train_rl", ["agent=stm", "agent.generator_seed=1"]) == ["agent=stm",
                                                                                   "agent.generator_seed=1"]
    assert check_overrides("train_rl", ["agent=transformer", "agent.residual=plain"])[1] == "++agent.residual=plain"
    # your own memory or env (imports / class paths) and any Gymnasium env's kwargs are checked when built
    own = ["agent.memory=my_memories:EMA", "+agent.decay=0.5", "env=gym", "env.id=my_envs:MyCue-v0", "env.foo=1"]
    assert check_overrides("train_rl", own) == own


@pytest.mark.parametrize("main, own, foreign", [
    (train_rl.main, ("agent (default gru)", "env (default delayed_cue)", "trigger (", "ppo (", "collector ("),
     ("model (", "task (", "suite (", "memory (")),
    (train_lm.main, ("model (default gru)", "task (default copy_memory)"), ("agent (", "env (", "suite (", "memory (")),
    (benchmark.main, ("suite (default smoke)", "throughput", "learning", "pareto"), ("agent (", "model (")),
])
def test_help_lists_only_the_commands_own_groups(main, own, foreign, capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for word in own:
        assert word in out, word
    for word in foreign:
        assert word not in out, word


def test_run_dirs_are_named_after_the_memory_a_run_set(tmp_path, monkeypatch):
    """``agent.memory=mlp`` on top of the default agent=gru is filed under ``mlp``, not ``gru``."""
    from rlmem.commands._hydra import run_label

    assert run_label("ot", "ssm", []) == "ot"  # an agent config keeps its own name
    assert run_label("gru", "my_memories:EMAMemory", ["++agent.memory=my_memories:EMAMemory"]) == "EMAMemory"
    monkeypatch.chdir(tmp_path)
    small = ["env.delay=1", "ppo.num_envs=4", "ppo.rollout_len=8", "ppo.seq_len=8", "ppo.minibatches=1",
             "total_frames=32", "logger.progress_bar=false"]
    train_rl.main(["agent.memory=mlp", *small])
    train_rl.main(small)
    assert sorted(p.name for p in (tmp_path / "outputs" / "train_rl").iterdir()) == ["gru-delayed_cue",
                                                                                   "mlp-delayed_cue"]
