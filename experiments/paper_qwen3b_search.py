"""The paper's search setting at its scale: Qwen2.5-3B (a Hugging Face directory) through WM-AMT, FE-SFT and
FC-RL on Search-R1 data with the Search-R1 retrieval server, on a TPU v4-32, a TPU v5e-64, a TPU v5e-8
or one 8-GPU host.

  fwm train --config experiments/paper_qwen3b_search.py:mid_train,v5e_64 --workdir $RUNS/mid_wm
  fwm train --config experiments/paper_qwen3b_search.py:sft,v5e_64 --workdir $RUNS/sft_full
  fwm train --config experiments/paper_qwen3b_search.py:rl,v5e_8 --workdir $RUNS/fc_rl
  (on a pod: launch/tpu_vm.sh run --config experiments/paper_qwen3b_search.py:mid_train,v5e_64 ...)
Evaluation on the seven Search-R1 test sets (EVAL_SETS: NQ, TriviaQA, PopQA, HotpotQA, 2Wiki, MuSiQue,
Bamboogle), one `fwm eval` each:
  fwm eval --config experiments/eval.py --config.checkpoint=$RUNS/fc_rl --config.tasks_format=search_r1 \\
      --config.tasks_file=DATA/search_r1/nq/test.parquet --config.env.retriever_url=RETRIEVER --workdir OUT/nq

Variants (comma-separated): one stage -- mid_train (WM-AMT; the control arm is the same command on the
corpus without blocks), sft (FE-SFT), rl (FC-RL) -- and one machine -- v4_32, v5e_64, v5e_8, gpu8
(default v5e_64; rl: gpu8). Paths (MODEL_DIR, DATA, RUNS, RETRIEVER) are placeholders: edit them or pass
--config.init.source / --config.data.train_files / --config.rl.retriever_url. Each stage starts from the
previous stage's checkpoints (RUNS/mid_wm -> RUNS/sft_full -> RUNS/fc_rl); the corpora (DATA) are LM
records of Search-R1 training trajectories with world-model blocks (mid_train_wm; the control arm the
same without blocks), FE-SFT step samples (sft_full) and RL task records {"id", "question", "answers"}
(rl_tasks.jsonl, from Search-R1's NQ + HotpotQA train split: fwm.envs.readers.read_search_r1).

Stage 'rl' runs on every machine: on a pod each host runs the episodes of its share of the rollout (whole
groups of its own tasks; fwm/rl/loop.py), so rl.rollout_batch (80 on the TPUs) is a multiple of hosts x
group_size (v5e_64: 16 hosts x 5). The rl memory lines below are for v5e_8 and gpu8; on v4_32 / v5e_64 the
update's state is spread over fsdp 16 and each device holds fewer rows.

Model (Qwen2.5-3B config.json): vocab V = 151,936 (tied), D = 2048, 36 layers, 16 query / 2 KV heads of
128, MLP 11,008, QKV bias. Parameters: embedding V*D = 311.2M; per layer q,o 2*2048*2048 + k,v 2*2048*256
+ biases 2,560 + MLP 3*2048*11008 + norms 4,096 = 77.08M; total 311.2M + 36*77.08M = 3.086B.

Expected memory per device (GiB = 2^30 bytes; fwm.train.memory.estimate computes the same; the compiled
step's own number is logged at start-up). float32 master weights and AdamW moments (model.param_dtype
float32), bfloat16 compute, remat 'full', train.loss_chunk_size 512, seq_len S = 4096.
  state over fsdp f: params 3.086B*4 B = 11.50 GiB / f; AdamW mu+nu 2x that; float32 gradients 1x (2x with
    micro-batches: the accumulator and the micro-batch's own).
    f = 16: params 0.719 + AdamW 1.437 + grads 1.437 = 3.59 GiB;  f = 8: 1.437 + 2.874 + 2.874 = 7.19 GiB
  per row of a micro-batch (r rows per device):
    saved layer inputs  36 layers * S * D * 2 B          = 0.563 GiB
    one layer's work    matmul outputs S*(2D + 2560 + 2048 + 3*11008)*2 B = 0.318 GiB
                        + float32 attention scores/probs 16 heads * S^2 * 4 B * 2 = 2.000 GiB
    logits, chunked     3 * 512 * V * 4 B (+ hidden S*D*2 B)                    = 0.885 GiB
                        (unchunked: 3 * S * V * 4 B = 6.96 GiB per row)
    = 3.77 GiB per row (over half of it the S x S attention scores: fwm's attention is plain XLA, no
    flash/splash kernel); plus one layer's weights gathered over fsdp in bf16, fwd + bwd: 0.287 GiB
  mid_train (global batch 256 x 4096 = 1.05M tokens per step) and sft (batch 64):
    v4_32  (16 chips x 32 GiB, mesh fsdp 16): mid 256/16 = 16 rows, 4 micro-batches of r = 4:
           3.59 + 0.287 + 4*3.77 = 18.9 GiB;  sft 64/16 = 4 rows, r = 4, 1 micro: 3.59 - 0.72 + 0.287 + 15.1 = 18.2
    v5e_64 (64 chips x 16 GiB, mesh data 4 x fsdp 16): mid 256/64 = 4 rows, 2 micro of r = 2:
           3.59 + 0.287 + 2*3.77 = 11.4 GiB;  sft 64/64 = 1 row: 2.87 + 0.287 + 3.77 = 6.9
    v5e_8  (8 chips x 16 GiB, fsdp 8): r = 1: 7.19 + 0.287 + 3.77 = 11.2 GiB (mid: 32 micro-batches)
    gpu8   (8 x H100 80 GB = 74.5 GiB, fsdp 8): mid 256/8 = 32 rows, 4 micro of r = 8: 7.19 + 0.287 + 8*3.77 = 37.6 GiB
  rl (update on one host, fsdp 8; + the frozen reference for the KL, 1.437 GiB; rows padded to S at most):
    v5e_8  r = 1: 7.19 + 1.44 + 0.287 + 3.77 = 12.7 GiB of 16. Sampling (not at the same time): params and
           moments 4.31 + reference 1.44 + KV cache 36*2*S*2*128*2 B = 144 MiB per episode x 80/8 = 1.41 = 7.2
    gpu8   r = 8: 7.19 + 1.44 + 0.287 + 30.1 = 39.0 GiB of 74.5; sampling: 4.31 + 1.44 + 144 MiB x 640/8 = 17.0
Why these meshes: fsdp (ZeRO-3) over 16 chips keeps the state at 3.6 GiB; v5e-64 adds data 4 over it so
each all-gather stays inside a 16-chip group; tensor 1 because a 3B model's matmuls are too small to split.
"""
import math

from fwm.config import default_config
from fwm.configlib import ConfigError, parse_variants

MODEL_DIR = "/data/models/Qwen2.5-3B"           # a Hugging Face directory (config.json, safetensors, tokenizer)
DATA = "gs://YOUR_BUCKET/fwm/data/search"        # corpora built from the Search-R1 training questions
RUNS = "gs://YOUR_BUCKET/fwm/runs/search"        # stage workdirs: each stage starts from the previous one's
RETRIEVER = "http://127.0.0.1:8000/retrieve"     # Search-R1's E5 server over the 2018 Wikipedia dump, top-3
EVAL_SETS = ("nq", "triviaqa", "popqa", "hotpotqa", "2wikimultihopqa", "musique", "bamboogle")

QWEN25_3B = dict(vocab_size=151936, hidden_size=2048, num_layers=36, num_heads=16, num_kv_heads=2, head_dim=128,
                 mlp_dim=11008, rope_theta=1000000.0, norm_eps=1e-6, tie_embeddings=True, qkv_bias=True,
                 max_seq_len=32768)
# machine -> mesh, rows per device per micro-batch (from the docstring's arithmetic), HBM per device, hosts
HARDWARE = {
    "v4_32": dict(mesh=dict(data=1, fsdp=16, tensor=1), rows=4, hbm_gib=32, hosts=4),
    "v5e_64": dict(mesh=dict(data=4, fsdp=16, tensor=1), rows=2, hbm_gib=16, hosts=16),
    "v5e_8": dict(mesh=dict(data=1, fsdp=8, tensor=1), rows=1, hbm_gib=16, hosts=1),
    "gpu8": dict(mesh=dict(data=1, fsdp=8, tensor=1), rows=8, hbm_gib=74.5, hosts=1),  # H100 80 GB
}
STAGES = ("mid_train", "sft", "rl")
SEQ_LEN = 4096
VARIANTS = STAGES + tuple(HARDWARE)


def micro_batches(rows: int, hardware: dict) -> int:
    """Micro-batches so each device computes at most `hardware['rows']` rows at a time."""
    devices = hardware["mesh"]["data"] * hardware["mesh"]["fsdp"]
    return max(1, math.ceil(rows / devices / hardware["rows"]))


def get_config(arg=None, where="experiments/paper_qwen3b_search.py"):
    variants = parse_variants(arg, VARIANTS, where, default="mid_train")
    stages = [v for v in STAGES if v in variants] or ["mid_train"]
    machines = [v for v in HARDWARE if v in variants] or ["gpu8" if "rl" in stages else "v5e_64"]
    if len(stages) > 1 or len(machines) > 1:
        raise ConfigError(f"{where}: pick one stage of {STAGES} and one machine of {tuple(HARDWARE)}, got {arg!r}")
    stage, machine = stages[0], machines[0]
    hardware = HARDWARE[machine]
    c = default_config()
    c.stage = stage
    c.init.source = f"hf:{MODEL_DIR}"  # WM-AMT starts from the base model; later stages from RUNS (below)
    c.model.update(QWEN25_3B)           # the checkpoint's shapes win; written out for the memory estimate
    c.model.update(dict(compute_dtype="bfloat16", param_dtype="float32", remat_policy="full"))
    c.mesh.update(hardware["mesh"])
    c.data.seq_len = SEQ_LEN
    c.train.update(dict(loss_chunk_size=512, log_every=10, keep_ckpts=3, async_checkpoint=True))
    c.optim.update(dict(b1=0.9, b2=0.95, weight_decay=0.1, clip_norm=1.0))
    if stage == "mid_train":
        # The paper mid-trains on ~200B tokens; one step is 1.05M: set train.steps for your corpus.
        c.data.train_files = (f"{DATA}/mid_train_wm/train-*.jsonl",)
        c.data.eval_files = (f"{DATA}/mid_train_wm/eval.jsonl",)
        c.data.update(dict(batch_size=256, worker_count=8))
        c.optim.update(dict(lr=2e-5, warmup_steps=200, schedule="cosine", min_lr_ratio=0.1))
        c.train.update(dict(steps=20000, ckpt_every=500, eval_every=1000, eval_batches=20))
    elif stage == "sft":
        c.init.source = f"orbax:{RUNS}/mid_wm/checkpoints"
        c.data.train_files = (f"{DATA}/sft_full/train.jsonl",)
        c.data.eval_files = (f"{DATA}/sft_full/eval.jsonl",)
        c.data.update(dict(batch_size=64, worker_count=4))
        c.optim.update(dict(lr=1e-5, warmup_steps=50, schedule="cosine", min_lr_ratio=0.1))
        c.train.update(dict(steps=1000, epochs=3.0, ckpt_every=200, eval_every=200))
    else:
        # Search-R1's GRPO: groups of 5, k3 KL 0.001, clip 0.2, lr 1e-6, 500-token responses, top-3 passages.
        c.init.source = f"orbax:{RUNS}/sft_full/checkpoints"
        c.data.train_files = (f"{DATA}/rl_tasks.jsonl",)  # Search-R1 NQ + HotpotQA train as RL task records
        rollout = 640 if machine == "gpu8" else 80
        c.rl.update(dict(tool="search", retriever_url=RETRIEVER, topk=3, group_size=5, rollout_batch=rollout,
                         max_turns=4, max_new_tokens=512, prompt_budget_tokens=SEQ_LEN - 512, temperature=1.0,
                         mini_batches=4, kl_beta=0.001, clip_eps_low=0.2, clip_eps_high=0.2, omega=0.2,
                         env_metric="exact_match", env_threads=32))
        update_rows = rollout * c.rl.max_turns // c.rl.mini_batches  # at most: every episode takes every turn
        c.optim.update(dict(lr=1e-6, warmup_steps=0, schedule="constant", weight_decay=0.0,
                            micro_batches=micro_batches(update_rows, hardware)))
        c.data.batch_size = rollout  # not read by RL; validated to split into optim.micro_batches
        c.train.update(dict(steps=1000, ckpt_every=10))
    if stage != "rl":
        c.optim.micro_batches = micro_batches(c.data.batch_size, hardware)
    return c
