"""`fwm bench`: runs the measurements, each in its own child process, prints the table and writes the JSON.

Every measurement (a train step of one size in one framework, a decode of one size and batch, the RL
iteration) runs in a fresh Python process, so its peak resident memory (ru_maxrss) is its own and one
framework's threads or caches never slow the other. fwm and its peer run one after the other for every
row; on a shared machine only these side-by-side ratios mean something, not the absolute numbers.
`--quick` (under 3 minutes) runs S only; the full run S / M / L.

  fwm bench [--quick] [--out bench.json]
  python -m fwm.bench.run --child '{"part": ...}'      (one measurement; prints its JSON)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from typing import Sequence

from fwm.bench import shapes
from fwm.files import write_json

# (part, implementation) -> "module:function"; each returns a dict of numbers.
MEASURES = {
    ("peak", "all"): "fwm.bench.peak:matmul_peaks",
    ("train", "fwm"): "fwm.bench.train:fwm_train",
    ("train", "torch"): "fwm.bench.train:torch_train",
    ("decode", "fwm"): "fwm.bench.sampler:fwm_decode",
    ("decode", "hf"): "fwm.bench.sampler:hf_decode",
    ("decode", "tunix"): "fwm.bench.sampler:tunix_decode",
    ("rl", "fwm"): "fwm.bench.rl:rl_iteration_split",
    ("data", "fwm"): "fwm.bench.data:lm_loader",
}
# Issue 14's targets, printed beside the measures (no test enforces them).
TRAIN_TARGETS = {"S": 1.5, "M": 1.0, "L": 1.0}       # fwm / torch tokens/s
TRAIN_MFU_TARGET = {"L": 0.6}                       # of the same run's best matmul peak
DECODE_TARGETS = {("S", 16): 5.0, ("M", 16): 3.0, ("M", 64): 3.0}  # fwm / transformers tokens/s
DATA_TARGET = 10.0                                  # loader tokens/s / the fastest train step's tokens/s
DECODE_TUNIX_TARGETS = {("M", 16): 2.5, ("M", 64): 2.5}              # fwm / tunix tokens/s


def plan(quick: bool, sizes: tuple[str, ...] | None = None, batch: int = 8, seq_len: int = 512,
         decode_batches: tuple[int, ...] | None = None, prompt_len: int = 64, max_new: int = 256,
         rl_size: str = "micro", rl_new_tokens: int = 32, steps: int = 3, data_docs: int = 2000) -> dict:
    """The run's settings (the JSON's "settings")."""
    sizes = sizes or (("S",) if quick else ("S", "M", "L"))
    return {"quick": quick, "train_sizes": list(sizes), "batch": batch, "seq_len": seq_len, "steps": steps,
            "decode_sizes": [s for s in sizes if s != "L"],  # the decode rows: S and M
            "decode_batches": list(decode_batches or ((16,) if quick else (1, 16, 64))),
            "prompt_len": prompt_len, "max_new": max_new, "decode_repeats": 1, "rl_size": rl_size,
            "rl_new_tokens": rl_new_tokens, "peak_sizes": [2048] if quick else [2048, 4096], "data_docs": data_docs}


def _call(part: str, impl: str, kwargs: dict) -> dict:
    module, function = MEASURES[(part, impl)].split(":")
    result = getattr(__import__(module, fromlist=[function]), function)(**kwargs)
    # ru_maxrss is in KiB on Linux: this process's peak, so one measure per child process.
    return {**result, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _measure(part: str, impl: str, kwargs: dict, in_process: bool) -> dict:
    """One measure, in a child process (or this one: a test's micro run, where the RSS is the process's)."""
    if in_process:
        return _call(part, impl, kwargs)
    job = json.dumps({"part": part, "impl": impl, "kwargs": kwargs})
    proc = subprocess.run([sys.executable, "-m", "fwm.bench.run", "--child", job], capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"fwm bench: the {part}/{impl} measure {kwargs} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def _machine() -> dict:
    import jax

    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    versions = {"jax": jax.__version__}
    for name in ("torch", "transformers"):
        spec = importlib.util.find_spec(name)
        versions[name] = __import__(name).__version__ if spec else None
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average_at_start": os.getloadavg(),
            "device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}", "versions": versions,
            "tunix": _tunix_version()}


def _tunix_version() -> str | None:
    """google-tunix's version where the `bench` extra installed it (its Sampler is then a decode column)."""
    if importlib.util.find_spec("tunix") is None:
        return None
    from importlib import metadata

    try:
        return metadata.version("google-tunix")
    except metadata.PackageNotFoundError:
        return "installed (version unknown)"


def _decode_rows(settings: dict, report: dict, hf_root: str, in_process: bool, log) -> None:
    for size in settings["decode_sizes"]:
        for batch in settings["decode_batches"]:
            kwargs = {"size": size, "batch": batch, "prompt_len": settings["prompt_len"], "max_new": settings["max_new"],
                      "repeats": settings["decode_repeats"], "hf_dir": os.path.join(hf_root, f"hf_{size}")}
            row = {"size": size, "batch": batch}
            for impl in ("fwm", "hf") + (("tunix",) if report["machine"]["tunix"] else ()):
                log(f"fwm bench: decode {size} batch {batch} ({impl})")
                row[impl] = _measure("decode", impl, kwargs, in_process)
            row["ratio"] = row["fwm"]["tokens_per_s"] / row["hf"]["tokens_per_s"]
            if "tunix" in row:
                row["ratio_tunix"] = row["fwm"]["tokens_per_s"] / row["tunix"]["tokens_per_s"]
            report["decode"].append(row)


def run(settings: dict, in_process: bool = False, log=print) -> dict:
    """Runs every measure of `settings` (see `plan`); returns the report (the JSON)."""
    started = time.perf_counter()
    report = {"settings": settings, "machine": _machine(), "flop_note": shapes.FLOP_NOTE}
    log(f"fwm bench: matmul peaks (n = {settings['peak_sizes']})")
    peak = report["peak"] = _measure("peak", "all", {"sizes": tuple(settings["peak_sizes"])}, in_process)
    report["train"] = []
    for size in settings["train_sizes"]:
        from fwm.model.transformer import num_params, train_flops_per_token

        cfg = shapes.model_config(size, max(settings["seq_len"], 512))
        row = {"size": size, "params": num_params(cfg), "flops_per_token": train_flops_per_token(cfg, settings["seq_len"])}
        kwargs = {"size": size, "batch": settings["batch"], "seq_len": settings["seq_len"], "steps": settings["steps"]}
        for impl in ("fwm", "torch"):
            log(f"fwm bench: train step {size} ({impl})")
            row[impl] = _measure("train", impl, kwargs, in_process)
            row[impl]["mfu"] = row[impl]["tokens_per_s"] * row["flops_per_token"] / peak["best"]
        row["ratio"] = row["fwm"]["tokens_per_s"] / row["torch"]["tokens_per_s"]
        report["train"].append(row)
    if settings.get("data_docs"):
        log("fwm bench: the LM loader")
        report["data"] = _measure("data", "fwm", {"batch": settings["batch"], "seq_len": settings["seq_len"],
                                                  "num_docs": settings["data_docs"]}, in_process)
        if report["train"]:
            fastest = max(report["train"], key=lambda r: r["fwm"]["tokens_per_s"])
            report["data"]["train_size"] = fastest["size"]
            report["data"]["ratio"] = report["data"]["tokens_per_s"] / fastest["fwm"]["tokens_per_s"]
    report["decode"] = []
    with tempfile.TemporaryDirectory() as hf_root:  # the random weights, exported for transformers
        _decode_rows(settings, report, hf_root, in_process, log)
    if settings.get("rl_size"):
        log("fwm bench: one FC-RL iteration")
        report["rl"] = _measure("rl", "fwm", {"size": settings["rl_size"], "max_new_tokens": settings["rl_new_tokens"]},
                                in_process)
    report["seconds"] = time.perf_counter() - started
    return report


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table's lines: header, separator, one line per row."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def table(report: dict) -> str:
    """The report as a Markdown table (what `fwm bench` prints and the README shows)."""
    m, s, peak = report["machine"], report["settings"], report["peak"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores ({m['device']}; load average at start "
             f"{m['load_average_at_start'][0]:.1f}); jax {m['versions']['jax']}, torch {m['versions']['torch']}, "
             f"transformers {m['versions']['transformers']}; google-tunix "
             + (f"{m['tunix']} (its Sampler is a decode column)." if m["tunix"] else "not installed (the `bench` extra "
                "installs it; no tunix column)."),
             "Float32 matmul peak (GFLOP/s): " + ", ".join(
                 f"{lib} n={n} {v / 1e9:.0f}" for lib in ("jax", "numpy") for n, v in peak[lib].items())
             + f"; MFU below is against the best, {peak['best'] / 1e9:.0f}. {report['flop_note']}.", ""]
    if report["train"]:
        lines += [f"Train step, batch {s['batch']} x seq {s['seq_len']}, forward + backward + clip + AdamW, float32 "
                  f"(best of {s['steps']} steps after 2 warm-up):", ""]
        rows = []
        for r in report["train"]:
            target = f">= {TRAIN_TARGETS[r['size']]}x" if r["size"] in TRAIN_TARGETS else ""
            if r["size"] in TRAIN_MFU_TARGET:
                target += f", MFU >= {TRAIN_MFU_TARGET[r['size']]:.0%}"
            rows.append([r["size"], f"{r['params'] / 1e6:.1f}M", f"{r['flops_per_token'] / 1e9:.3f}",
                         _fmt(r["fwm"]["tokens_per_s"]), f"{r['fwm']['mfu']:.1%}", _fmt(r["torch"]["tokens_per_s"]),
                         f"{r['torch']['mfu']:.1%}", f"**{r['ratio']:.2f}x**", target,
                         f"{r['fwm']['peak_rss_mb']:,.0f}", f"{r['torch']['peak_rss_mb']:,.0f}",
                         str(r["fwm"]["compiles_after_warmup"])])
        lines += _markdown_table(("size", "params", "GFLOP/token", "fwm tokens/s", "fwm MFU", "torch tokens/s",
                                  "torch MFU", "fwm / torch", "target", "fwm RSS MB", "torch RSS MB",
                                  "fwm compiles after warm-up"), rows) + [""]
    if report["decode"]:
        with_tunix = any("tunix" in r for r in report["decode"])
        lines += [f"Decode, prompt {s['prompt_len']}, {s['max_new']} new tokens (no early stop), greedy, float32, "
                  f"tokens/s of a whole call after a warm-up call:", ""]
        rows = []
        for r in report["decode"]:
            target = DECODE_TARGETS.get((r["size"], r["batch"]))
            row = [r["size"], str(r["batch"]), _fmt(r["fwm"]["tokens_per_s"]), _fmt(r["hf"]["tokens_per_s"]),
                   f"**{r['ratio']:.2f}x**", f">= {target}x" if target else ""]
            if with_tunix:
                tunix_target = DECODE_TUNIX_TARGETS.get((r["size"], r["batch"]))
                row += [_fmt(r["tunix"]["tokens_per_s"]), f"**{r['ratio_tunix']:.2f}x**",
                        f">= {tunix_target}x" if tunix_target else ""] if "tunix" in r else ["", "", ""]
            agree = [r[impl].get("rows_agreeing_first_8_tokens", float("nan")) for impl in ("hf", "tunix") if impl in r]
            rows.append(row + [f"{r['fwm']['peak_rss_mb']:,.0f}", f"{r['hf']['peak_rss_mb']:,.0f}",
                               str(r["fwm"]["compiles_after_warmup"]), " / ".join(f"{a:.2f}" for a in agree)])
        header = ("size", "batch", "fwm tokens/s", "transformers tokens/s", "fwm / transformers", "target")
        if with_tunix:
            header += ("tunix tokens/s", "fwm / tunix", "target")
        header += ("fwm RSS MB", "transformers RSS MB", "fwm compiles after warm-up",
                   "rows agreeing with fwm (first 8 tokens): transformers" + (" / tunix" if with_tunix else ""))
        lines += _markdown_table(header, rows) + [""]
    if "data" in report:
        d = report["data"]
        lines.append(f"LM loader (read, validate, tokenize, pack; batch {s['batch']} x {s['seq_len']}, "
                     f"{d['documents']} documents, no worker processes): {_fmt(d['tokens_per_s'])} tokens/s"
                     + (f", **{d['ratio']:.1f}x** the fastest train step's consumption (fwm {d['train_size']}; "
                        f"target >= {DATA_TARGET:.0f}x)" if "ratio" in d else "") + ".")
    if "rl" in report:
        r = report["rl"]
        lines.append(f"One FC-RL iteration ({r['episodes']} episodes, {r['max_new_tokens']} new tokens per turn, "
                     f"{r['model']}): rollout {r['rollout_s']:.2f} s, reward {r['reward_s'] * 1000:.1f} ms, update "
                     f"{r['update_s']:.2f} s (total {r['iteration_s']:.2f} s; peak RSS {r['peak_rss_mb']:,.0f} MB).")
    lines.append(f"Bench wall time {report['seconds']:.0f} s.")
    return "\n".join(lines)


def main(quick: bool, out: str) -> dict:
    """`fwm bench`: runs, prints the table, writes `out` (JSON)."""
    report = run(plan(quick), log=lambda line: print(line, file=sys.stderr, flush=True))
    write_json(out, report)
    print(table(report), flush=True)
    print(f"wrote {out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one fwm bench measure (fwm bench runs these)")
    parser.add_argument("--child", required=True, help='{"part": ..., "impl": ..., "kwargs": {...}}')
    job = json.loads(parser.parse_args().child)
    print(json.dumps(_call(job["part"], job["impl"], job["kwargs"])), flush=True)
