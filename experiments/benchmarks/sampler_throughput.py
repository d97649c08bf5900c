"""Decode speed of fwm.rollout.sampler.generate against a naive per-token loop, on a random model.

  python experiments/benchmarks/sampler_throughput.py [--batch 8 --prompt 48 --new 128 --hidden 256 --layers 4]

Both decode greedily from the same prompts with the same KV cache code (fwm.model.transformer): the
sampler runs prefill and a lax.while_loop on the device; the naive loop calls a jitted decode_step once
per token from Python and takes the argmax on the host (a device->host sync per token). Both are timed
after a warm-up call (compilation excluded); the tokens must agree (printed). Prints new tokens/s.
"""
import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=48)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from fwm.model import kv_cache, transformer
    from fwm.rollout import sampler

    heads = max(1, args.hidden // 64)
    cfg = transformer.ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                                  num_heads=heads, num_kv_heads=heads, head_dim=64, mlp_dim=4 * args.hidden,
                                  max_seq_len=args.prompt + args.new + 64)
    params = transformer.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    prompts = [[2] + rng.integers(4, args.vocab, args.prompt - 1).tolist() for _ in range(args.batch)]

    prefill = jax.jit(kv_cache.prefill, static_argnums=0)
    step = jax.jit(kv_cache.decode_step, static_argnums=0)

    step_params = kv_cache.decode_params(cfg, params)  # split once: the stacked ones would be split every step

    def naive() -> list[list[int]]:
        cache = kv_cache.init_cache(cfg, args.batch, args.prompt + args.new)
        logits, cache, positions = prefill(cfg, params, cache, jnp.asarray(prompts, jnp.int32))
        token = np.asarray(jnp.argmax(logits[:, -1], axis=-1))
        out = [token]
        for _ in range(args.new - 1):
            logits, cache = step(cfg, step_params, cache, jnp.asarray(token, jnp.int32), positions)
            positions = positions + 1
            token = np.asarray(jnp.argmax(logits, axis=-1))  # host sync per token
            out.append(token)
        return np.stack(out, axis=1).tolist()

    def ours() -> list[list[int]]:
        return [s.tokens for s in sampler.generate(cfg, params, prompts, args.new)]

    results = {}
    for name, fn in (("sampler (prefill + while_loop)", ours), ("naive per-token loop", naive)):
        tokens = fn()  # warm-up: compile
        start = time.perf_counter()
        for _ in range(args.repeats):
            tokens = fn()
        seconds = (time.perf_counter() - start) / args.repeats
        results[name] = tokens
        print(f"{name:32s} {args.batch * args.new / seconds:10.0f} new tokens/s  ({seconds * 1000:.1f} ms per call)")
    same = results["sampler (prefill + while_loop)"] == results["naive per-token loop"]
    print(f"model: {transformer.num_params(cfg) / 1e6:.2f}M parameters, batch {args.batch}, prompt {args.prompt}, "
          f"{args.new} new tokens, {jax.devices()[0].platform}; identical tokens: {same}")


if __name__ == "__main__":
    main()
