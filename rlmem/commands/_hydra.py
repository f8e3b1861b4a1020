"""What every Hydra command shares: the overrides checked first (one line, exit code 2), its own ``--help``
(only the config groups it composes), and the Hydra entry point on ``pkg://rlmem.conf``."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import yaml
from omegaconf import OmegaConf

from rlmem.commands.overrides import COMMAND_GROUPS, _yaml, available, check_overrides, default_choices

CONFIG_PATH = "pkg://rlmem.conf"

#: how each command is started (console script, module); scripts/<command>.py in a checkout does the same
ENTRY_POINTS = {
    "train_rl": ("rlmem-train", "python -m rlmem.commands.train_rl"),
    "train_lm": ("rlmem-train-lm", "python -m rlmem.commands.train_lm"),
    "evaluate": ("rlmem-evaluate", "python -m rlmem.commands.evaluate"),
    "benchmark": ("rlmem-benchmark", "python -m rlmem.commands.benchmark"),
    "sb3_reference": (None, "python -m rlmem.commands.sb3_reference"),
}


def help_text(command: str, summary: str) -> str:
    """``--help``: what the command does, its config groups with their options, its top-level keys."""
    script, module = ENTRY_POINTS[command]
    starts = " | ".join(s for s in (script, module, f"python scripts/{command}.py") if s)
    lines = [summary.strip(), "", f"Usage: {starts} [group=option] [group.key=value] [key=value] [-m ...]", ""]
    groups = COMMAND_GROUPS[command]
    if groups:
        defaults = default_choices(command)
        lines.append("Config groups (rlmem/conf/<group>/; pick one with group=name, change a knob with group.key=value):")
        for group in groups:
            lines.append(f"  {group} (default {defaults.get(group, '-')}): {', '.join(available(group))}")
        lines.append("")
    top = {k: v for k, v in _yaml(f"{command}.yaml").items() if k not in ("defaults", "hydra")}
    if top:
        lines.append("Top-level keys (their defaults):")
        lines += ["  " + line for line in yaml.safe_dump(top, sort_keys=False, width=110).splitlines()]
        lines.append("")
    lines.append("Hydra: -m/--multirun sweeps a,b lists; --cfg job prints the composed config; --hydra-help "
                 "lists Hydra's own options.")
    return "\n".join(lines)


def run_label(agent_choice: str, memory: str, overrides: Sequence[str]) -> str:
    """The agent part of a run dir's name (``${rlmem_run_label:...}`` in the configs): the agent config's name,
    or the memory's when the command line set ``agent.memory`` (``agent.memory=ema`` -> ``ema``; a class path
    ``my_memories:EMAMemory`` -> ``EMAMemory``), so a run of your own memory is not filed under ``gru``."""
    if any(str(o).lstrip("+").startswith("agent.memory=") for o in overrides):
        return str(memory).rsplit(":", 1)[-1].rsplit(".", 1)[-1]
    return str(agent_choice)


def fail(command: str, message: str) -> None:
    """The one line of an invalid configuration (stderr), exit code 2."""
    print(f"{command}: invalid configuration: {message}", file=sys.stderr)
    sys.exit(2)


def run_hydra(command: str, config_name: str, task_function: Callable[[Any], Any], summary: str,
              argv: Sequence[str] | None = None) -> None:
    """Check the overrides, answer ``--help``, then run ``task_function`` under ``@hydra.main``."""
    import hydra

    args = list(sys.argv[1:] if argv is None else argv)
    if "--help" in args or "-h" in args:
        print(help_text(command, summary))
        return
    try:
        args = check_overrides(command, args)
    except ValueError as err:
        fail(command, str(err))
    sys.argv[1:] = args
    if not OmegaConf.has_resolver("rlmem_run_label"):
        OmegaConf.register_new_resolver("rlmem_run_label", run_label)
    hydra.main(config_path=CONFIG_PATH, config_name=config_name, version_base="1.3")(task_function)()


def qualified(err: Exception, group: str, keys: Sequence[str]) -> Exception:
    """``err`` with its message prefixed by ``group.`` when it starts with one of the group's keys
    (``delay must be in [0, inf]`` -> ``env.delay must be in [0, inf]``); other errors unchanged."""
    if not isinstance(err, ValueError) or len(err.args) != 1 or not isinstance(err.args[0], str):
        return err
    head, sep, message = err.args[0].partition(": ") if ": " in err.args[0][:40] else ("", "", err.args[0])
    for key in sorted(keys, key=len, reverse=True):  # "gru: hidden_size must ..." -> "gru: agent.hidden_size must ..."
        if message.startswith((f"{key} ", f"{key}=")):
            return ValueError(f"{head}{sep}{group}.{message}")
    return err
