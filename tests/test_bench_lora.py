"""bench/bench_lora.py --quick: base SFT-mixed, then SSFT full FT and SSFT LoRA from its export, evaluated."""
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_lora_quick_reports_both_arms(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_lora

    result = bench_lora.main(["--quick", "--out", str(tmp_path)])
    arms = result["arms"]
    assert set(arms) == {"full", "lora"}
    # LoRA trains fewer parameters and plans less weight state than full fine-tuning of the same model.
    assert arms["lora"]["trainable_params"] < arms["full"]["trainable_params"]
    assert arms["lora"]["plan_state_bytes"] < arms["full"]["plan_state_bytes"]
    for a in arms.values():
        m = a["eval"]["tag_strategy_counts"]
        assert len(m) == 6 and sum(map(sum, m)) == 6 * result["heldout"]  # one greedy generation per tag
        assert 0.0 <= a["eval"]["mutual_information_frac_logM"] <= 1.0
    assert "| lora |" in result["report"]
    assert json.loads((tmp_path / "results.json").read_text())["steps"] == 4
    # a second run into the same folder starts over (it would otherwise resume the finished runs and train nothing)
    again = bench_lora.main(["--quick", "--out", str(tmp_path)])
    assert again["arms"]["lora"]["eval"]["tag_strategy_counts"] == arms["lora"]["eval"]["tag_strategy_counts"]
