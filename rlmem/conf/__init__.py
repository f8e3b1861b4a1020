"""rlmem's Hydra configs, shipped as package data and read with ``pkg://rlmem.conf``."""

from pathlib import Path

#: the folder of the configs (``agent/``, ``env/``, ``train_rl.yaml``, ...), for code that lists or reads them
CONF_DIR = Path(__file__).resolve().parent
