"""Training throughput of experiments/tiny.py through the real loop: tokens/s and an MFU estimate.

  python experiments/benchmarks/train_throughput.py [--steps 200] [--variant pretrain] [--devices 1]

Runs `fwm.train.loop.run` (Grain pipeline, placement, jitted step, metrics one step late) in a
temporary workdir with eval off and one checkpoint at the end, and prints the loop's own measure:
steps/s, tokens/s (batch x seq_len per step) and MFU = transformer.train_flops_per_token x tokens/s
over the devices' peak (on CPU the float32 matmul peak measured at start, see fwm/train/metrics.py).
Compilation, evaluation and checkpointing are not counted. `fwm bench` compares the step with transformers.
"""
import argparse
import importlib.util
import os
import sys
import tempfile


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--variant", default="pretrain", help="experiments/tiny.py arg (pretrain, mid_train, sft)")
    parser.add_argument("--devices", type=int, default=0,
                        help="simulated CPU devices (XLA host platform count); 0 keeps the default")
    return parser.parse_args()


def main() -> None:
    args = _parse()
    if args.devices:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}").strip()
    import jax
    from absl import logging

    from fwm.train import loop

    logging.set_verbosity(logging.WARNING)
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("tiny", os.path.join(here, "..", "tiny.py"))
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    config = tiny.get_config(args.variant)
    config.data.eval_files = ()
    config.train.steps = args.steps
    config.train.log_every = max(args.steps // 10, 1)
    config.train.ckpt_every = args.steps
    with tempfile.TemporaryDirectory() as workdir:
        config.train.workdir = workdir
        result = loop.run(config)
    perf = result.perf
    devices = jax.devices()
    print(f"experiments/tiny.py:{args.variant}  {result.model_config.num_layers} layers x "
          f"{result.model_config.hidden_size}, batch {config.data.batch_size} x seq {config.data.seq_len}, "
          f"{args.steps} steps on {len(devices)} x {devices[0].device_kind} ({os.cpu_count()} host cores)")
    print(f"steps/s      {perf['perf/steps_per_s']:.2f}")
    print(f"tokens/s     {perf['perf/processed_tokens_per_s']:,.0f} processed (batch x seq_len), "
          f"{perf['perf/trained_tokens_per_s']:,.0f} trained (loss weight > 0)")
    if "perf/mfu" in perf:
        from fwm.train.metrics import peak_flops_per_device

        _, note = peak_flops_per_device(devices[0].device_kind, devices[0].platform, jax.local_device_count(),
                                        float(config.train.peak_flops_per_device))
        print(f"MFU          {100 * perf['perf/mfu']:.2f}%  ({note})")
    print(f"final loss   {result.last_record.get('loss', float('nan')):.4f}")


if __name__ == "__main__":
    sys.exit(main())
