"""README's "Your own memory, your own env" example, run as written (with smaller budgets)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SMALL = ["ppo.num_envs=8", "ppo.rollout_len=16", "ppo.seq_len=8", "ppo.minibatches=2", "ppo.eval_episodes=8"]


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def user_folder(tmp_path: Path) -> Path:
    """The README's ``# my_*.py`` files, written into a fresh folder."""
    files = {code.splitlines()[0][2:]: code for code in blocks("python") if code.startswith("# my_")}
    assert set(files) == {"my_memories.py", "my_envs.py"}, sorted(files)
    for name, code in files.items():
        (tmp_path / name).write_text(code)
    return tmp_path


def test_readme_own_memory_and_env_commands_work(tmp_path):
    folder = user_folder(tmp_path)
    commands = [line for block in blocks("bash") for line in block.splitlines() if "my_memories" in line]
    assert len(commands) == 2, commands
    check, train = (shlex.split(c) for c in commands)
    assert check[0] == "python"
    out = subprocess.run([sys.executable, *check[1:]], cwd=folder, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert train[0] == "rlmem-train"  # the console script: the same main() as python -m rlmem.commands.train_rl
    args = [a for a in train[1:] if not a.startswith("total_frames=")]
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "rlmem.commands.train_rl", *args, "total_frames=256", *SMALL,
                          f"hydra.run.dir={run_dir}"], cwd=folder, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["frames"] == 256 and metrics["memory"] == "ema" and metrics["env_id"] == "MyBit-v0"
    assert 0 <= metrics["eval_success"] <= 1  # MyBit-v0 declares reward_threshold=1.0


def test_readme_python_entry_point_works(tmp_path):
    folder = user_folder(tmp_path)
    code = next(b for b in blocks("python") if "RecurrentPPO(" in b)
    small = code.replace("total_frames=50_000", "total_frames=256").replace("num_envs=32", "num_envs=8")
    assert small != code
    small += "\nimport json; print(json.dumps({k: metrics[k] for k in ('frames', 'memory')}))\n"
    out = subprocess.run([sys.executable, "-c", small], cwd=folder, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"frames": 512, "memory": "ema"}  # one batch of 8 x 64
    assert (folder / "outputs" / "my_run" / "checkpoints" / "last.pt").exists()
