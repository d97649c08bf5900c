"""`fwm bench` on the micro shape, in process: every measure is a number, nothing compiles after warm-up,
and the table renders. Not a timed test: the numbers' sizes are never asserted."""
import json
import math

from fwm.bench import run as bench


def _numbers(tree, path=""):
    """Every leaf of the report that should be a measure, with its path."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _numbers(value, f"{path}.{key}")
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from _numbers(value, f"{path}[{i}]")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


def test_micro_bench_reports_numbers_and_no_recompilation(tmp_path):
    settings = bench.plan(quick=True, sizes=("micro",), batch=2, seq_len=16, decode_batches=(2,), prompt_len=8,
                          max_new=8, rl_size="", steps=2, data_docs=200)
    settings["peak_sizes"] = [256]
    report = json.loads(json.dumps(bench.run(settings, in_process=True, log=lambda line: None)))  # JSON-able
    (train,), (decode,) = report["train"], report["decode"]
    for impl in ("fwm", "torch"):
        assert train[impl]["tokens_per_s"] > 0 and 0 < train[impl]["mfu"] and train[impl]["peak_rss_mb"] > 0
    for impl in ("fwm", "hf"):
        assert decode[impl]["tokens_per_s"] > 0
    assert train["ratio"] > 0 and decode["ratio"] > 0 and report["peak"]["best"] > 0
    # The loader is compared with the train step it feeds.
    assert report["data"]["tokens"] > 0 and report["data"]["ratio"] > 0 and report["data"]["train_size"] == "micro"
    assert train["flops_per_token"] > 6 * 32 * 32  # at least the micro model's matmuls
    # Warm-up compiles everything: the timed train steps and generate calls compile nothing.
    assert train["fwm"]["compiles_after_warmup"] == 0
    assert decode["fwm"]["compiles_after_warmup"] == 0 and decode["fwm"]["new_sampler_programs"] == 0
    # Same weights through save_hf, greedy: transformers picks the same first tokens.
    assert decode["hf"]["rows_agreeing_first_8_tokens"] == 1.0
    bad = [path for path, value in _numbers(report) if not math.isfinite(value)]
    assert not bad, f"non-finite measures at {bad}"
    text = bench.table(report)
    assert "| micro |" in text and "fwm / torch" in text and "fwm / transformers" in text and "LM loader" in text


def test_micro_bench_decodes_with_tunix_where_installed():
    """Only with the `bench` extra (google-tunix): its Sampler decodes the same exported weights to the same
    greedy tokens, and the table gets the tunix column."""
    import pytest

    pytest.importorskip("tunix")
    settings = bench.plan(quick=True, sizes=("micro",), decode_batches=(2,), prompt_len=8, max_new=8, rl_size="",
                          data_docs=0)
    settings.update(train_sizes=[], peak_sizes=[256])
    report = bench.run(settings, in_process=True, log=lambda line: None)
    (decode,) = report["decode"]
    assert report["machine"]["tunix"] and decode["tunix"]["tokens_per_s"] > 0 and decode["ratio_tunix"] > 0
    assert decode["tunix"]["rows_agreeing_first_8_tokens"] == 1.0
    assert "fwm / tunix" in bench.table(report)
