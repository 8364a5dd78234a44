"""Train the bundled default model: a small Pythia-style (GPT-NeoX) language model with its own
byte-level BPE tokenizer, on the offline ``"default"`` corpus.

The loop is deliberately plain (in the spirit of nanoGPT): sample windows, forward, backward,
clip, step, log. It saves log-spaced checkpoints (steps 0, 128, 256, 512, ... like Pythia's) so
the paper's training-dynamics figure can be reproduced, and writes a model card.

Run it with ``bigram-circuits train-default --out runs/default_model`` (about 35 minutes on
2 CPU cores); ``--install`` copies the result into the package so ``load_model("default")``
uses it.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from bigram_circuits.data import load_documents, split_documents, tokenize_documents
from bigram_circuits.devices import resolve_device
from bigram_circuits.errors import ModelLoadError
from bigram_circuits.evaluate import mean_next_token_loss, next_tokens
from bigram_circuits.io import atomic_directory, atomic_save_into, atomic_write_bytes

__all__ = [
    "TrainConfig",
    "init_model",
    "install_default_model",
    "neox_config",
    "state_sha256",
    "train_default_model",
    "train_tokenizer",
]

EOS = "<|endoftext|>"


@dataclass
class TrainConfig:
    """Hyper-parameters of the default model and its training run."""

    corpus: str = "default"
    vocab_size: int = 6144  # the tokenizer's vocabulary size
    d_model: int = 256  # residual stream width
    n_layers: int = 4  # transformer blocks
    n_heads: int = 8  # attention heads per block
    d_mlp: int = 1024  # MLP hidden width
    context: int = 256  # the model's context (positions)
    seq_len: int = 128  # tokens per training window
    batch_size: int = 16
    max_steps: int = 3500  # training steps
    lr: float = 1e-3  # peak learning rate (cosine decay to min_lr)
    min_lr: float = 1e-4  # learning rate at the end of the cosine decay
    warmup_steps: int = 100  # steps of linear learning-rate warm-up
    weight_decay: float = 0.1  # AdamW weight decay
    grad_clip: float = 1.0  # gradient norm clip
    eval_every: int = 250  # steps between held-out evaluations
    eval_windows: int = 256  # held-out windows per evaluation
    seed: int = 0  # training seed
    bf16_autocast: bool = True  # bfloat16 autocast in the forward and backward
    device: str = "cpu"
    # steps whose weights are kept (Fig 2)
    checkpoint_steps: tuple[int, ...] = field(default_factory=lambda: (0, 128, 512, 1024, 2048))


def train_tokenizer(documents: list[str], vocab_size: int, out_dir: Path):
    """Train a byte-level BPE tokenizer (GPT-2/NeoX style) and save it as a HF directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS
    )
    atomic_save_into(out_dir, lambda staging: fast.save_pretrained(staging))
    return fast


def neox_config(cfg: TrainConfig, tokenizer):
    """The GPT-NeoX (Pythia-style: rotary on 25% of dims, parallel residual) config."""
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        intermediate_size=cfg.d_mlp,
        max_position_embeddings=cfg.context,
        rotary_pct=0.25,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def init_model(cfg: TrainConfig, model_cfg):
    """Step-0 weights: seeded initialisation on the CPU, so the same seed gives the same model
    whatever device trains it."""
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(cfg.seed)
    return GPTNeoXForCausalLM(model_cfg)


def state_sha256(model) -> str:
    """Hash of a model's fp16 state dict (checks that a re-created checkpoint is identical)."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float16).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def _eval_loss(model, windows: np.ndarray, batch_size: int = 32) -> float:
    model.eval()
    loss = mean_next_token_loss(
        lambda batch: model(input_ids=batch).logits,
        windows,
        device=next(model.parameters()).device,
        batch_size=batch_size,
    )
    model.train()
    return loss


def _unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _save_weights(model, path: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import save

    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, save(state, metadata={"format": "pt"}))


def _greedy(model, tokenizer, prompt: str, n_tokens: int = 30) -> str:
    model.eval()
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    new = next_tokens(
        lambda tokens: model(input_ids=tokens).logits, ids, n_tokens, device=next(model.parameters()).device
    )
    model.train()
    return tokenizer.decode(ids + new)


SAMPLE_PROMPTS = (
    "The President of the United States",
    "The city is located in",
    "In the year 1865, the",
    "Congress should",
)


def train_default_model(out_dir: str | os.PathLike, cfg: TrainConfig | None = None) -> dict:
    """Train tokenizer and model from scratch; returns the metrics written to ``metrics.json``."""
    from tqdm.auto import tqdm

    cfg = cfg or TrainConfig()
    device = resolve_device(cfg.device)  # the one resolution of this pipeline, before any work
    out = Path(out_dir)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    started = time.time()

    documents = load_documents(cfg.corpus)
    train_docs, eval_docs = split_documents(documents)
    tokenizer = train_tokenizer(train_docs, cfg.vocab_size, out)
    train_tokens = tokenize_documents(train_docs, tokenizer).tokens
    eval_tokens = tokenize_documents(eval_docs, tokenizer).tokens
    n_train = len(train_tokens) // cfg.seq_len
    train_windows = train_tokens[: n_train * cfg.seq_len].reshape(n_train, cfg.seq_len)
    n_eval = min(cfg.eval_windows, len(eval_tokens) // cfg.seq_len)
    eval_windows = eval_tokens[: n_eval * cfg.seq_len].reshape(n_eval, cfg.seq_len)

    model_cfg = neox_config(cfg, tokenizer)
    model = init_model(cfg, model_cfg).to(device)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(n_train)
    cursor = 0
    history: list[dict] = []
    checkpoints: list[int] = []

    def maybe_checkpoint(step: int) -> None:
        if step in cfg.checkpoint_steps:
            _save_weights(model, out / "checkpoints" / f"step_{step}.safetensors", torch.float16)
            checkpoints.append(step)

    step0_sha256 = state_sha256(model)
    maybe_checkpoint(0)
    bar = tqdm(range(1, cfg.max_steps + 1), desc="train default model", unit="step")
    running = None
    for step in bar:
        if cursor + cfg.batch_size > n_train:
            order, cursor = rng.permutation(n_train), 0
        batch = torch.as_tensor(
            np.asarray(train_windows[np.sort(order[cursor : cursor + cfg.batch_size])], dtype=np.int64)
        ).to(device)
        cursor += cfg.batch_size
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step - 1, cfg)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
            logits = model(input_ids=batch).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.3f}")
        record = {"step": step, "tokens": step * cfg.batch_size * cfg.seq_len, "train_loss": loss.item()}
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            record["eval_loss"] = _eval_loss(model, eval_windows)
            bar.write(f"step {step}: train {running:.3f} eval {record['eval_loss']:.3f}")
        history.append(record)
        maybe_checkpoint(step)

    # Shipped in fp16 (half the size); load_model casts to the requested dtype.
    _save_weights(model, out / "model.safetensors", torch.float16)
    atomic_save_into(out, lambda staging: model_cfg.save_pretrained(staging))
    final_eval = _eval_loss(model.half().float(), eval_windows)  # as shipped (fp16 weights)
    unigram_h = _unigram_entropy(eval_tokens, len(tokenizer))
    samples = {prompt: _greedy(model, tokenizer, prompt) for prompt in SAMPLE_PROMPTS}
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.get_input_embeddings().weight.numel() + model.get_output_embeddings().weight.numel()
    metrics = {
        "config": {**asdict(cfg), "device": str(device)},
        "n_parameters": n_params,
        "n_non_embedding_parameters": n_params - n_embed,
        "train_tokens_available": len(train_tokens),
        "eval_tokens": len(eval_tokens),
        "tokens_seen": cfg.max_steps * cfg.batch_size * cfg.seq_len,
        "final_eval_loss_nats": final_eval,
        "final_eval_perplexity": math.exp(final_eval),
        "eval_unigram_entropy_nats": unigram_h,
        "checkpoints": checkpoints + [cfg.max_steps],
        "step0_sha256": step0_sha256,
        "training_seconds": time.time() - started,
        "hardware": _hardware(device),
        "samples_greedy": samples,
        "history": history,
    }
    atomic_write_bytes(out / "metrics.json", json.dumps(metrics, indent=1).encode())
    atomic_write_bytes(out / "MODEL_CARD.md", _model_card(metrics).encode())
    return metrics


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"


def _model_card(m: dict) -> str:
    c = m["config"]
    evals = [(h["step"], h["tokens"], h["eval_loss"]) for h in m["history"] if "eval_loss" in h]
    curve = "\n".join(f"| {s} | {t:,} | {e:.3f} |" for s, t, e in evals)
    samples = "\n".join(f"- **{p}** → {s!r}" for p, s in m["samples_greedy"].items())
    return f"""# bigram_circuits default model

A Pythia-style GPT-NeoX language model trained from scratch by `bigram-circuits train-default`
on the offline `default` corpus (State of the Union speeches + English Wikipedia leads), with its
own byte-level BPE tokenizer of {c["vocab_size"]} tokens trained on the same training split.

| | |
|---|---|
| layers / d_model / heads / d_mlp | {c["n_layers"]} / {c["d_model"]} / {c["n_heads"]} / {c["d_mlp"]} |
| parameters (all / non-embedding) | {m["n_parameters"]:,} / {m["n_non_embedding_parameters"]:,} |
| training tokens available / seen | {m["train_tokens_available"]:,} / {m["tokens_seen"]:,} |
| steps x batch x seq | {c["max_steps"]} x {c["batch_size"]} x {c["seq_len"]} |
| eval loss (nats) / perplexity | {m["final_eval_loss_nats"]:.3f} / {m["final_eval_perplexity"]:.1f} |
| unigram entropy of eval split (nats) | {m["eval_unigram_entropy_nats"]:.3f} |
| training time | {m["training_seconds"] / 60:.1f} min on {m["hardware"]} |
| checkpoints (steps) | {", ".join(map(str, m["checkpoints"]))} |

## Eval loss curve
| step | tokens | eval loss |
|---|---|---|
{curve}

## Greedy continuations
{samples}
"""


def _recreate_step0(run: Path, target: Path) -> None:
    """Re-create the step-0 checkpoint from the seed (it is not transferred when training ran
    elsewhere) and check it against the hash recorded by the training run."""
    from transformers import GPTNeoXConfig

    metrics = json.loads((run / "metrics.json").read_text())
    cfg = TrainConfig(**{**metrics["config"], "checkpoint_steps": tuple(metrics["config"]["checkpoint_steps"])})
    model = init_model(cfg, GPTNeoXConfig.from_pretrained(run))
    if state_sha256(model) != metrics["step0_sha256"]:
        raise ModelLoadError("re-created step-0 weights differ from the training run's; copy step_0 from the run")
    _save_weights(model, target, torch.float16)


def install_default_model(run_dir: str | os.PathLike) -> Path:
    """Copy a trained run into the package assets (final weights fp32, checkpoints fp16)."""
    run = Path(run_dir)
    target = Path(__file__).parent / "assets" / "default_model"
    with atomic_directory(target) as staging:
        for path in run.iterdir():
            if path.is_file() and path.suffix in {".json", ".md", ".safetensors", ".txt"}:
                shutil.copy2(path, staging / path.name)
        shutil.copytree(run / "checkpoints", staging / "checkpoints")
        step0 = staging / "checkpoints" / "step_0.safetensors"
        if not step0.exists():
            _recreate_step0(run, step0)
    return target
