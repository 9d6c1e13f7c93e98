"""`herd bench sampler` on small sizes: one figure per output length, from the real CLI."""
import json

from cluster.cli import main


def test_bench_sampler_reports_each_stage_per_output_length(tmp_path):
    out = tmp_path / "sampler.json"
    assert main(["bench", "sampler", "--batch", "4", "--vocab", "500", "--output-tokens", "10,300",
                 "--logit-bias-tokens", "20", "--steps", "3", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert (report["bench"], report["batch"], report["vocab"]) == ("sampler", 4, 500)
    assert [level["output_tokens"] for level in report["levels"]] == [10, 300]
    assert all(level["penalties_ms_per_step"] > 0 and level["logit_bias_ms_per_step"] > 0
               for level in report["levels"])


def test_bench_sampler_refuses_a_bad_flag(capsys):
    import pytest

    with pytest.raises(SystemExit) as e:
        main(["bench", "sampler", "--output-tokens", "0"])
    assert e.value.code == 2 and "--output-tokens" in capsys.readouterr().err
