"""Command-line overrides checked before Hydra composes anything, so a typo costs one line, not a page.

:func:`check_overrides` looks at the ``key=value`` arguments of a command (``train_rl``, ``train_lm``, ...):

- a config group choice (``agent=gruu``, ``env=delayd_cue``, ``trigger=lerned``, ``task=copy_mem``) must be a
  config of ``rlmem/conf/<group>/``;
- a knob of a group (``env.dealy=5``, ``agent.hidden_sise=64``, ``ppo.lrr=...``, ``trigger.x=``,
  ``collector.x=``, ``model.x=``, ``task.x=``) must be one the selected config accepts: an env's constructor
  arguments, a memory system's ``__init__`` arguments (+ ``memory``, ``encoder_dim`` / ``d_model``), the
  fields of ``PPOConfig``, the trigger policy's / collector's / logger's keys, an LM task's knobs;
- a top-level key (``total_frame=...``) must be one of the command's config;
- ``env.id`` must be a registered Gymnasium id (or ``module:Id``).

A mistake raises a ``ValueError`` in rlmem.validate's one-line style, e.g.
``env.dealy is not an option of env=delayed_cue (did you mean 'delay'?); valid: delay, difficulty, id, n_cues,
noise``. A valid knob that the yaml does not list (a constructor argument left at its default) is turned into
``++group.key=value``, so no ``+`` is ever needed for it. Whatever cannot be checked before the run (values,
your own memories and envs of ``imports=[...]``) is checked when the run is built.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

import yaml

from rlmem.conf import CONF_DIR, available
from rlmem.validate import check_choice, check_keys, suggest

#: the config groups each command composes (what its ``--help`` lists and what is checked here)
COMMAND_GROUPS: dict[str, tuple[str, ...]] = {
    "train_rl": ("agent", "env", "trigger", "ppo", "logger", "collector"),
    "train_lm": ("model", "task"),
    "evaluate": (),
    "benchmark": ("suite",),
    "sb3_reference": ("env",),
}

#: Hydra's own command-line flags that take a value (the value is not an override)
_FLAGS_WITH_VALUE = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--cfg", "-c",
                     "--package", "-p", "--info", "--experimental-rerun"}


@cache
def _yaml(path: str) -> dict[str, Any]:
    return yaml.safe_load((CONF_DIR / path).read_text()) or {}


def group_config(group: str, name: str) -> dict[str, Any]:
    """The keys of ``rlmem/conf/<group>/<name>.yaml`` with its defaults list resolved (``agent/<name>`` and
    ``model/<name>`` include ``memory/<name>``), as Hydra composes it (no interpolation is used there)."""
    raw = dict(_yaml(f"{group}/{name}.yaml"))
    merged: dict[str, Any] = {}
    for entry in raw.pop("defaults", []) or []:
        if isinstance(entry, str) and entry.startswith("/") and entry.endswith("@_here_"):
            sub_group, sub_name = entry[1:-len("@_here_")].split("/")
            merged.update(group_config(sub_group, sub_name))
    merged.update(raw)
    return merged


def default_choices(command: str) -> dict[str, str]:
    """The group choices of the command's primary config's defaults list (``{"agent": "gru", ...}``)."""
    choices = {}
    for entry in _yaml(f"{command}.yaml").get("defaults", []) or []:
        if isinstance(entry, dict):
            (group, name), = entry.items()
            if not group.startswith("override "):
                choices[group] = name
    return choices


def _parse(args: Sequence[str]) -> list[tuple[int, str, str, str]]:
    """``(index, prefix, key, value)`` of every ``[+|++|~]key=value`` override (flags and their values skipped)."""
    parsed, skip = [], False
    for i, arg in enumerate(args):
        if skip and "=" not in arg:  # the value of a flag like --cfg job
            skip = False
            continue
        skip = False
        if arg.startswith("-"):
            skip = arg in _FLAGS_WITH_VALUE
            continue
        if "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        if "/" in key:  # hydra/launcher=..., group/sub=...: Hydra's own
            continue
        prefix = key[: len(key) - len(key.lstrip("+~"))]
        parsed.append((i, prefix, key[len(prefix):], value))
    return parsed


def _values(value: str, multirun: bool) -> list[str]:
    """The choices a group override names: a sweep ``a,b`` in a multirun; none for sweep functions."""
    if "(" in value or "$" in value:
        return []
    return [v.strip() for v in value.split(",")] if multirun else [value.strip()]


def _params(fn: Callable, skip: Sequence[str]) -> list[str] | None:
    """The keyword parameters of ``fn`` (None if it takes ``**kwargs``: anything goes)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return [p for p in params if p not in ("self", *skip)]


def _env_knobs(env_id: str) -> list[str] | None:
    """The constructor knobs of an rlmem env (its task's); None for other Gymnasium envs, whose kwargs
    (``max_episode_steps``, the env's own) go to ``gymnasium.make`` as they are."""
    import gymnasium as gym

    import rlmem  # noqa: F401  (registers the rlmem envs)

    if not env_id.startswith("rlmem/") or env_id not in gym.registry:
        return None
    entry = gym.spec(env_id).entry_point
    if isinstance(entry, str):
        from gymnasium.envs.registration import load_env_creator

        entry = load_env_creator(entry)
    task = getattr(entry, "task_cls", None)
    if task is not None:
        return _params(task.__init__, ("num_envs",))
    return _params(entry.__init__ if isinstance(entry, type) else entry, ("render_mode",))


def _memory_knobs(memory: Any) -> list[str] | None:
    import rlmem
    from rlmem.memory.registry import memory_class, memory_options

    if not isinstance(memory, str) or memory not in rlmem.available_memories():
        return None  # a class path or your own memory (imports=[...]): checked when the run is built
    return memory_options(memory_class(memory))


def _trigger_knobs(policy: Any) -> list[str] | None:
    from rlmem.agents import triggers

    if not isinstance(policy, str) or policy not in triggers.TRIGGER_POLICIES:
        return None
    cls = triggers.TRIGGER_POLICIES.get(policy)
    defines = next(k for k in cls.__mro__ if "__init__" in vars(k))  # a policy without knobs inherits nn.Module's
    knobs = _params(cls.__init__, ("d_context",)) if issubclass(defines, triggers.TriggerPolicy) else []
    return None if knobs is None else [*knobs, "policy", *triggers.COST_KEYS]


def _task_knobs(name: Any) -> list[str] | None:
    from rlmem.lm_tasks.tasks import TASKS, knob_names

    return None if name not in TASKS else [*knob_names(TASKS[name]), "name"]


def _ppo_knobs() -> list[str]:
    from rlmem.ppo import PPOConfig

    return [f.name for f in dataclasses.fields(PPOConfig)]


def _valid_knobs(group: str, choice: str, config: dict[str, Any], args_values: dict[str, str]) -> list[str] | None:
    """The knobs ``group.<key>`` accepts with ``choice`` selected (None: not checkable here)."""
    listed = set(config)
    if group == "env":
        env_id = args_values.get("id", config.get("id"))
        if choice == "gym" or not isinstance(env_id, str):
            return None  # any Gymnasium env: its kwargs go to gymnasium.make as they are
        knobs = _env_knobs(env_id)
        return None if knobs is None else sorted(listed | set(knobs) | {"id", "difficulty"})
    if group in ("agent", "model"):
        knobs = _memory_knobs(args_values.get("memory", config.get("memory")))
        width = "encoder_dim" if group == "agent" else "d_model"
        return None if knobs is None else sorted(listed | set(knobs) | {"memory", width})
    if group == "trigger":
        knobs = _trigger_knobs(args_values.get("policy", config.get("policy")))
        return None if knobs is None else sorted(listed | set(knobs))
    if group == "ppo":
        return sorted(listed | set(_ppo_knobs()))
    if group == "task":
        knobs = _task_knobs(args_values.get("name", config.get("name")))
        return None if knobs is None else sorted(listed | set(knobs))
    if group in ("collector", "logger"):
        return sorted(listed)
    return None  # suite: nested groups, checked by rlmem.suite.plan


def _renamed(command: str) -> dict[str, str]:
    """Options of earlier versions and their new names."""
    if command != "train_lm":
        return {}
    from rlmem.lm_training import RENAMED

    return dict(RENAMED)


def check_env_id(env_id: Any) -> None:
    """``env.id`` must be a registered Gymnasium id (the env factory's check); a ``module:Id`` is imported, and
    so checked, when the run is built."""
    if isinstance(env_id, str) and ":" not in env_id:
        from rlmem.env_factory import resolve_env_id

        resolve_env_id(env_id)


def check_overrides(command: str, args: Sequence[str]) -> list[str]:
    """Check ``args`` (a command's ``sys.argv[1:]``) as described in the module docstring; returns them with
    valid knobs that the yaml does not list turned into ``++group.key=value``. Raises ``ValueError``."""
    groups = COMMAND_GROUPS[command]
    multirun = any(a in ("-m", "--multirun") for a in args)
    parsed = _parse(args)
    choices = default_choices(command)
    for _, prefix, key, value in parsed:
        if key in groups and not prefix.startswith("~"):
            for v in _values(value, multirun):
                check_choice(key, v, available(key), what=f"a config of rlmem/conf/{key}/")
            if not multirun and _values(value, multirun):
                choices[key] = value.strip()
    top = set(_yaml(f"{command}.yaml")) - {"defaults", "hydra"}
    out = list(args)
    imports = any(key == "imports" for _, _, key, _ in parsed)
    for i, prefix, key, value in parsed:
        head, _, rest = key.partition(".")
        if head == "hydra" or prefix.startswith("~"):
            continue
        if not rest:
            if not prefix and key not in groups and key not in top:
                renamed = _renamed(command)
                if key in renamed:
                    raise ValueError(f"{key} is now {renamed[key]} ({renamed[key]}={value})")
                valid = sorted(top | set(groups))
                raise ValueError(f"{key} is not an option of {command}{suggest(key, valid)}; valid: "
                                 f"{', '.join(valid)} (config groups: {', '.join(groups)})")
            continue
        if head not in groups or head not in choices:
            continue
        knob = rest.split(".", 1)[0]
        choice = choices[head]
        config = group_config(head, choice)
        if head == "env" and knob == "id" and not imports and not multirun:
            check_env_id(value)
        given = {k.split(".", 1)[1]: v for _, _, k, v in parsed if k.startswith(f"{head}.") and "," not in v}
        valid = _valid_knobs(head, choice, config, given)
        if valid is None:
            continue
        check_keys(head, [knob], valid, of=f"{head}={choice}")
        if knob not in config and not prefix and rest == knob:
            out[i] = f"++{key}={value}"  # a valid knob the yaml leaves to its default: Hydra needs the "++"
    return out
