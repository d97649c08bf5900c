"""fwm.report on a hand-made pipeline workdir: two rows, one with two seeds, one seed still running, and a
sweep that asked for a third row: mean ± sample standard deviation over seeds, pooled reliability bins,
every figure drawn, the missing rows named with their state."""
import os
import shutil

import pytest

from fwm import report, runs
from fwm.files import DataFormatError, write_json, write_jsonl


def _eval_results(score, ece, bins, curve, selected=None, format_adherence=0.9, selected_expected=None,
                  episodes=4):
    greedy = {"by_source": {"all": {"episodes": 10, "score": score, "format_adherence": format_adherence,
                                    "response_tokens": 50.0}},
              "calibration": {"steps": {"ece": ece, "brier": 0.2, "auroc": None, "reliability": bins}},
              "keyword_grounding": {"rate": 0.5}, "planning_horizon": {"horizon": None},
              "recovery": {"rate": 0.25, "episodes": episodes}, "risk_coverage": curve}
    results = {"greedy": greedy}
    if selected is not None:
        results["sampled"] = {"k": 4, "by_source": {"all": {"selected@4": selected, "mean@4": 0.1, "pass@4": 0.3}}}
    if selected_expected is not None:
        results["sampled"]["expected_q"] = {"selected@4": selected_expected}
    return results


def _bin(lo, count, mean_q, accuracy):
    return {"lo": lo, "hi": lo + 0.1, "count": count, "mean_q": mean_q, "accuracy": accuracy}


def _write_run(workdir, row, seed, status, results=None, rl=None, plan_eval=True):
    stages = []
    if rl is not None:
        rl_dir = runs.stage_dir(workdir, "rl_fc_rl", f"{row}{seed}".ljust(12, "0"))
        write_jsonl(os.path.join(rl_dir, "metrics.jsonl"), [{"step": s, "reward": r, "correct": c} for s, r, c in rl])
        stages.append({"stage": "rl", "label": "rl_fc_rl", "dir": rl_dir, "fingerprint": "f", "skipped": False,
                       "seconds": 12.0})
    record = {"row": row, "seed": seed, "label": row.upper(), "reference": "50.6", "status": status,
              "stages": stages, "plan": {"pretrain": True, "mid_train": "wm", "sft": True, "format": "full",
                                         "rl": "fc_rl", "eval": plan_eval}, "seconds": 30.0}
    if results is not None:
        eval_dir = runs.stage_dir(workdir, "eval_full", f"e{row}{seed}".ljust(12, "0"))
        write_json(os.path.join(eval_dir, "eval.json"), results)
        record["eval_dir"] = eval_dir
        stages.append({"stage": "eval", "label": "eval_full", "dir": eval_dir, "fingerprint": "e", "skipped": True,
                       "seconds": 3.0})
    runs.write_row(workdir, record)


def test_report_of_a_partly_finished_sweep(tmp_path):
    workdir = str(tmp_path)
    runs.register_sweep(workdir, "demo", ["a", "b", "c"], [0, 1], {"a": "A"}, note="mechanics only")
    curve = [{"threshold": 0.0, "coverage": 1.0, "accuracy": 0.2}, {"threshold": 0.5, "coverage": 0.4,
                                                                     "accuracy": 0.5},
             {"threshold": 1.0, "coverage": 0.0, "accuracy": None}]
    _write_run(workdir, "a", 0, "finished", _eval_results(0.2, 0.1, [_bin(0.1, 3, 0.15, 0.0)], curve, 0.3,
                                                          selected_expected=0.6), rl=[(2, 0.1, 0.0), (4, 0.3, 0.5)])
    _write_run(workdir, "a", 1, "finished", _eval_results(0.4, 0.3, [_bin(0.1, 1, 0.19, 1.0),
                                                                     _bin(0.8, 2, 0.85, 1.0)], curve, 0.5,
                                                          selected_expected=0.8, episodes=7))
    _write_run(workdir, "b", 0, "finished", _eval_results(0.0, 0.05, [], curve, format_adherence=0.95))
    _write_run(workdir, "b", 1, "preempted", rl=[(2, 0.0, 0.0)])
    path = report.write_report(workdir)
    page = open(path, encoding="utf-8").read()

    rows, _ = report.gather(workdir)
    assert [r.row for r in rows] == ["a", "b"]
    assert report._pooled_bins(list(rows[0].evals.values())) == [
        {"lo": 0.1, "hi": pytest.approx(0.2), "count": 4, "mean_q": pytest.approx(0.16), "accuracy": 0.25},
        {"lo": 0.8, "hi": pytest.approx(0.9), "count": 2, "mean_q": 0.85, "accuracy": 1.0}]
    table = report.table_text(path).splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header == ["row", "n", "score %", "format %", "ECE", "Brier", "grounding %", "recovery %",
                      "recovery n", "tokens/episode", "selected@k %", "selected@k E[q] %", "mean@k %", "pass@k %",
                      "paper"]
    # (AUROC, horizon and the greedy E[q] columns: None in every row, left out)
    a = [c.strip() for c in table[2].strip("|").split("|")]
    # std with ddof=1; A's format (90 %) is below 95 %: marked, B's (95 %) is not
    assert a[:5] == ["A †", "2", "30.0 ± 14.1", "90.0 ± 0.0", "0.200 ± 0.141"]
    assert a[header.index("selected@k %")] == "40.0 ± 14.1" and a[-1] == "50.6"
    assert a[header.index("selected@k E[q] %")] == "70.0 ± 14.1"
    assert a[header.index("recovery n")] == "6 ± 2"  # episodes behind the recovery rate: 4 and 7
    b = [c.strip() for c in table[3].strip("|").split("|")]
    assert b[:4] == ["B", "1", "0.0", "95.0"] and b[header.index("selected@k %")] == "-"
    assert "- b seed 1: preempted" in page and "- c seed 0: not started" in page and "- c seed 1: not started" in page
    assert "a seed 0" not in page.split("## Missing rows")[1].split("## Figures")[0]
    assert page.count("† format adherence below 95%") == 1
    # each finished seed's own values, with the table's columns (b seed 1 was preempted: not there)
    per_seed = page.split("## Per seed")[1].split("## Missing rows")[0].strip().splitlines()
    assert [c.strip() for c in per_seed[0].strip("|").split("|")] == ["row", "seed"] + header[2:-1]
    assert [line.split("|")[1:4] for line in per_seed[2:]] == [[" A † ", " 0 ", " 20.0 "], [" A † ", " 1 ", " 40.0 "],
                                                                [" B ", " 0 ", " 0.0 "]]
    assert per_seed[3].split("|")[header.index("recovery n") + 1].strip() == "7"
    assert "> mechanics only" in page and "rl_fc_rl 12, eval_full reused" in page
    for name in ("table", "reliability", "risk_coverage", "rl_curves"):
        assert f"figures/{name}.png" in page
        with open(os.path.join(workdir, "figures", f"{name}.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_table_text_is_the_results_table_or_says_none_finished(tmp_path):
    workdir = str(tmp_path)
    _write_run(workdir, "a", 0, "preempted")
    path = report.write_report(workdir)
    assert "| a | A |" in open(path, encoding="utf-8").read()  # the configuration table is there
    assert report.table_text(path) == "(no row has finished its evaluation yet)"  # and is not the results table
    _write_run(workdir, "b", 0, "finished", _eval_results(0.5, 0.1, [], []))
    text = report.table_text(report.write_report(workdir)).splitlines()
    assert text[0].startswith("| row | n | score %") and text[2].startswith("| B † | 1 | 50.0 |")
    assert len(text) == 4 and text[3].startswith("† format adherence below 95%")


def test_a_bad_row_record_names_the_file(tmp_path):
    path = tmp_path / "runs" / "a" / "seed0" / "row.json"
    write_json(path, {"row": "a", "seed": 0})
    with pytest.raises(DataFormatError, match=r"row.json.*missing \['status', 'stages'\]"):
        report.write_report(str(tmp_path))


def test_mean_and_spread_leaves_undefined_values_out():
    assert report.mean_and_spread([None, None]) == (None, None, 0)
    assert report.mean_and_spread([0.5, None]) == (0.5, None, 1)
    mean, spread, n = report.mean_and_spread([1.0, 2.0, 3.0])
    assert (mean, n) == (2.0, 3) and spread == pytest.approx(1.0)


def test_a_moved_workdir_and_seeds_gathered_from_two_machines_are_reported(tmp_path):
    # seed 0 and seed 1 of one row ran on two machines, each in its own /.../fwm_study; their workdirs are then
    # copied into one directory elsewhere: the records' absolute paths name directories that no longer exist
    machines = [str(tmp_path / f"machine{i}" / "fwm_study") for i in (0, 1)]
    for seed, workdir in enumerate(machines):
        _write_run(workdir, "a", seed, "finished", _eval_results(0.2 + 0.2 * seed, 0.1, [], []),
                   rl=[(2, 0.1 * seed, 0.0)])
    gathered = str(tmp_path / "gathered")
    for workdir in machines:
        for part in (runs.STAGES_DIR, runs.RUNS_DIR):
            shutil.copytree(os.path.join(workdir, part), os.path.join(gathered, part), dirs_exist_ok=True)
        shutil.rmtree(workdir)
    rows, _ = report.gather(gathered)
    assert sorted(rows[0].evals) == [0, 1] and sorted(rows[0].rl) == [0, 1]
    assert rows[0].rl[1] == [(2, 0.1, 0.0)]
    a = report.table_text(report.write_report(gathered)).splitlines()[2]
    assert a.startswith("| A † | 2 | 30.0 ± 14.1 |"), a
    # a seed gathered without its eval stage is named, not silently left out of the table
    shutil.rmtree(os.path.join(gathered, runs.STAGES_DIR, "eval_full-ea1000000000"))
    page = open(report.write_report(gathered), encoding="utf-8").read()
    assert report.table_text(os.path.join(gathered, runs.REPORT)).splitlines()[2].startswith("| A † | 1 | 20.0 |")
    assert "- a seed 1: finished, but its eval.json is in neither stages/eval_full-ea1000000000 here" in page


def test_located_prefers_the_workdirs_own_stage_directory(tmp_path):
    elsewhere = str(tmp_path / "old" / runs.STAGES_DIR / "sft_full-0123456789ab")
    assert runs.located(str(tmp_path / "new"), elsewhere) == elsewhere  # not here: the recorded path
    here = os.path.join(str(tmp_path / "new"), runs.STAGES_DIR, "sft_full-0123456789ab")
    os.makedirs(here)
    assert runs.located(str(tmp_path / "new"), elsewhere + "/") == here
