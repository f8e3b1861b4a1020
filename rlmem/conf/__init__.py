"""rlmem's Hydra configs, shipped as package data and read with ``pkg://rlmem.conf``.

``memory/<name>.yaml`` is the one config of a memory system: ``agent/<name>.yaml`` (train_rl) and
``model/<name>.yaml`` (train_lm) include it and add the encoder / embedding width; ``model/<name>.yaml``
lists the LM defaults that differ from the RL agent's.
"""

from pathlib import Path

#: the folder of the configs (``agent/``, ``env/``, ``train_rl.yaml``, ...), for code that lists or reads them
CONF_DIR = Path(__file__).resolve().parent


def available(group: str) -> list[str]:
    """The config names of ``rlmem/conf/<group>/`` (``available("agent")``: every ``agent=<name>``)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
