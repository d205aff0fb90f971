"""Tutorial 2: train a CLT on your own model, from an activation cache on disk.

Tutorial 1 streamed activations from the model while training. For real models you usually
run the model once, write its activations to a compressed cache, and train (possibly many
CLTs with different sizes and sparsity) from the cache: reading a cache is far cheaper than
running the model again, and a cache can be written by many jobs at once.

On a GPU machine with internet access the whole thing is three commands, starting from a
packaged config (``clt_lens/configs/gpt2-small.yaml``; also ``pythia-160m``,
``gemma-2-2b``, ``llama-3.2-1b``)::

    # 1. run GPT-2 over OpenWebText once; split over machines with --job-index/--num-jobs
    #    and finish with `clt-lens cache --merge runs/gpt2-cache`
    clt-lens cache --model gpt2 --dataset Skylion007/openwebtext --context_size 1024 \\
        --n_tokens 4e8 --device cuda --out_dir runs/gpt2-cache
    # 2. train from it: one process ...
    clt-lens train gpt2-small --cache_dir runs/gpt2-cache --distributed none
    #    ... or data parallel over 8 GPUs (every rank runs the same command)
    torchrun --nproc_per_node 8 -m clt_lens train gpt2-small --cache_dir runs/gpt2-cache
    #    (--distributed feature shards the features of a wide CLT over the GPUs instead;
    #     --distributed 2d --feature_parallel_size 4 combines both)
    # 3. evaluate
    clt-lens eval runs/gpt2-small --device cuda

From Python the model is ``clt_lens.load_model("gpt2", device="cuda")`` (a TransformerLens
name) or ``load_model("/path/to/hf_folder")``. This script does the same steps offline, on a
local Hugging Face folder (``--model-dir``; default: the folder of the embedded model, which
is a plain ``GPT2LMHeadModel`` folder) and a local text/json/jsonl/parquet file or folder
(``--dataset``). Supported local families: GPT-2, Llama, Qwen2, Qwen3, Gemma-2, GPT-NeoX.

Run it::

    python tutorials/02_your_own_model.py                          # the embedded model's folder
    python tutorials/02_your_own_model.py --model-dir ~/my-model --dataset ~/texts/
    python tutorials/02_your_own_model.py --small                  # seconds (the test suite)

A dataset folder may hold ``train*.txt`` and ``heldout*.txt`` (or ``test*``, ``validation*``)
files: the held-out split is used for evaluation. A single file has only a train split; the
script then evaluates on training text and says so.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

SIZES = {
    "full": dict(cache_tokens=262_144, d_sae=512, n_steps=400, batch_size=1024,
                 heldout_tokens=4096, eval_tokens=4096, context_size=None),
    # context 32 keeps a tiny test text file enough for several sequences
    "small": dict(cache_tokens=4096, d_sae=64, n_steps=24, batch_size=256,
                  heldout_tokens=256, eval_tokens=62, context_size=32),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true",
                   default=os.environ.get("CLT_LENS_TUTORIAL_SMALL") == "1",
                   help="tiny sizes (also: CLT_LENS_TUTORIAL_SMALL=1)")
    p.add_argument("--out", default="runs/tutorials/02", help="output directory")
    p.add_argument("--model-dir", default=None,
                   help="local Hugging Face model folder (default: the embedded model's folder)")
    p.add_argument("--dataset", default="embedded",
                   help="local text/json/jsonl/parquet file or folder, 'embedded', or a hub name")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def heldout_split(dataset: str, tokenizer, context_size: int) -> str:
    """The dataset's held-out split name, or "train" (with a warning) when it has none."""
    from clt_lens.data import DataLoadError, load_tokens

    for split in ("heldout", "test", "validation"):
        try:
            load_tokens(dataset, tokenizer=tokenizer, context_size=context_size, split=split,
                        max_tokens=context_size, shuffle=False)
            return split
        except DataLoadError:
            continue
    print(f"note: {dataset!r} has no held-out split; evaluating on training text "
          "(numbers will be optimistic). Put heldout*.txt files beside train*.txt to fix this.")
    return "train"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size = SIZES["small" if args.small else "full"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from clt_lens import load_model, model_id
    from clt_lens.cache import CacheConfig, generate_cache, inspect
    from clt_lens.config import load_config
    from clt_lens.evals import evaluate, markdown_table
    from clt_lens.models import EMBEDDED_DIR
    from clt_lens.training import CLTTrainingRunner, SourceConfig, TrainConfig
    from clt_lens.training.cli import resolve_config_path

    model_dir = str(Path(args.model_dir or EMBEDDED_DIR).expanduser().resolve())

    # ------------------------------------------------------------------------------------
    # 1. Load the model. A local folder needs config.json, *.safetensors weights (pickled
    #    pytorch_model.bin files are refused: unpickling can run code) and, to read text,
    #    tokenizer files. Nothing is downloaded. Its model_id includes a digest of the
    #    weights, so a cache made with one training of an architecture cannot be used
    #    with another.
    # ------------------------------------------------------------------------------------
    print("== 1. model ==")
    model = load_model(model_dir, device=args.device)
    c = model.cfg
    ctx = size["context_size"] or c.n_ctx
    ctx = min(ctx, c.n_ctx)
    print(f"{model_dir}\n  {c.original_architecture}: {c.n_layers} layers, d_model {c.d_model}, "
          f"d_mlp {c.d_mlp}, vocab {c.d_vocab}, context {c.n_ctx} (using {ctx})")
    print(f"  model_id {model_id(model)}")

    # ------------------------------------------------------------------------------------
    # 2. The activation cache. CacheConfig's fields are also `clt-lens cache` flags. The
    #    shards hold x (input hook) and y (output hook) for every layer, compressed with the
    #    default "errbound" codec: per-layer quantisation whose error is bounded (FVU <= 1e-3
    #    by default), a few times smaller than fp16. generate_cache is resumable: run it
    #    again after a crash and it redoes only missing or corrupt shards. With
    #    job_index/num_jobs several processes (or machines) write disjoint shards.
    # ------------------------------------------------------------------------------------
    print("\n== 2. activation cache ==")
    cache_dir = out / "cache"
    cache_cfg = CacheConfig(
        source=SourceConfig(
            model=model_dir,
            dataset=args.dataset,
            split="train",
            context_size=ctx,
            input_hook="ln2.hook_normalized",   # block-relative, as in tutorial 1
            output_hook="hook_mlp_out",
        ),
        n_tokens=size["cache_tokens"],
        shard_tokens=max(1024, size["cache_tokens"] // 8),
        out_dir=str(cache_dir),
        device=args.device,
    )
    # model=... reuses the loaded model; without it generate_cache loads cfg.source.model itself.
    manifest = generate_cache(cache_cfg, model=model)
    assert manifest is not None  # None only when other jobs of a split run are unfinished
    print(inspect(cache_dir))

    # ------------------------------------------------------------------------------------
    # 3. Training from the cache. Start from the packaged GPT-2 config to see what a real
    #    run sets, then override what differs on a laptop. Overrides are a dict here; on
    #    the command line they are "--field value" pairs. The config is validated before
    #    any work starts (try d_sae=-1).
    # ------------------------------------------------------------------------------------
    print("\n== 3. training from the cache ==")
    gpt2_yaml = resolve_config_path("gpt2-small")
    reference = load_config(TrainConfig, gpt2_yaml)
    print(f"{gpt2_yaml.name}: d_sae {reference.clt.d_sae}, batch {reference.batch_size}, "
          f"{reference.n_steps} steps, sparsity_coeff {reference.clt.sparsity_coeff}, "
          f"device {reference.device}, distributed {reference.distributed}")
    split = heldout_split(args.dataset, model.tokenizer, ctx)
    cfg = load_config(TrainConfig, gpt2_yaml, {
        # the sections as in the YAML file: `source` (what the CLT reads), `clt` (the CLT)
        "source": {"model": model_dir, "dataset": args.dataset, "context_size": ctx},
        "clt": {"d_sae": size["d_sae"],
                "sparsity_coeff": 0.3},   # the scale suits small models; see tutorial 1
        "cache_dir": str(cache_dir),      # train from the cache, not by running the model
        "heldout_split": split,           # held-out EV/L0 during training (model streamed)
        "batch_size": size["batch_size"],
        "n_steps": size["n_steps"],
        "lr": 1e-3,
        "lr_warmup_steps": size["n_steps"] // 10,
        "sparsity_warmup_steps": size["n_steps"] // 3,
        "dead_window_tokens": size["batch_size"] * size["n_steps"] // 2,
        "normalization_tokens": min(4096, size["cache_tokens"]),
        "heldout_tokens": size["heldout_tokens"],
        "eval_every": max(1, size["n_steps"] // 2),
        "checkpoint_every": size["n_steps"] // 2,  # resumable from here (and final)
        "stream_sequences_per_refill": 16,
        "device": args.device,
        "distributed": "none",            # torchrun + "ddp"/"feature"/"2d" on several GPUs
        "out_dir": str(out / "train"),
    })
    # `extra` (free-form notes saved with the checkpoint) merges key by key, and the GPT-2
    # file's notes describe GPT-2: replace them rather than merge.
    cfg.extra = {"tutorial": "02_your_own_model", "model_dir": model_dir}
    # A cache records which model (model_id) and hooks made it. Before the first step the
    # trainer refuses a cache whose hooks differ from the config's, and, as it streams the
    # held-out text through the model, one made by a different model.
    clt = CLTTrainingRunner(cfg, override_model=model).run()
    final = out / "train" / "final"
    print(f"trained {clt.cfg.n_layers} x {clt.cfg.d_sae} features -> {final}")

    # ------------------------------------------------------------------------------------
    # 4. Evaluate on held-out text, exactly as in tutorial 1. model= may also be the folder
    #    path; the checkpoint remembers the dataset it was trained on. As a command:
    #    `clt-lens eval RUN/final --source.dataset DATA --source.split SPLIT` (the `source`
    #    section; unset, its fields are the ones the CLT was trained on).
    # ------------------------------------------------------------------------------------
    print("\n== 4. evaluation ==")
    result = evaluate(final, model=model, dataset=args.dataset, split=split,
                      n_tokens=size["eval_tokens"], device=args.device,
                      out_dir=out / "eval")
    print(markdown_table(result))
    print(f"\ndone: cache {cache_dir}, checkpoint {final}, evaluation {out / 'eval'}.")
    print("An interrupted run continues from its last checkpoint with the same config and "
          f"CLTTrainingRunner(cfg, resume={str(out / 'train')!r}) (or clt-lens train --resume).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
