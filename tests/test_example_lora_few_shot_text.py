"""examples/lora_few_shot_text.py --quick: LoRA adapters meta-learned, adapted, saved, reloaded."""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

PATH = Path(__file__).parents[1] / "examples" / "lora_few_shot_text.py"


def _example():
    spec = importlib.util.spec_from_file_location("lora_few_shot_text", PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_adapters_are_meta_learned_and_saved_for_peft_alone(tmp_path):
    example = _example()
    result = example.train(iterations=2, tasks=2, ways=3, shots=2, queries=2, inner_steps=1,
                           eval_tasks=2)
    assert all(math.isfinite(loss) for loss in result["losses"])
    learner = result["learner"]
    assert all("lora_" in n or "modules_to_save" in n for n in learner.adapted_names())
    frozen = {n: p.detach().clone() for n, p in learner.module.named_parameters()
              if not p.requires_grad}
    adapted = example.adapt_and_save(learner, result["held_out"], 2, tmp_path)
    assert all(torch.equal(p, frozen[n]) for n, p in learner.module.named_parameters()
               if n in frozen)
    query = {k: v[0] for k, v in result["held_out"].query_x.items()}
    loaded = peft.PeftModel.from_pretrained(example.base_model(3), tmp_path / "adapted")
    torch.testing.assert_close(loaded(**query).logits, adapted(**query).logits)


@pytest.mark.slow
def test_the_quick_run_learns(tmp_path):
    out = subprocess.run([sys.executable, str(PATH), "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, check=True, timeout=900).stdout
    found = re.search(r"adaptation: ([\d.]+) before meta-training -> ([\d.]+) after", out)
    assert found is not None, out
    before, after = float(found[1]), float(found[2])
    assert after > before, out
    assert (tmp_path / "adapted" / "adapter_config.json").exists()
