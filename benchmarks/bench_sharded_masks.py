"""Per-rank memory and step time of weight-mask search state, replicated vs sharded (FSDP2).

    python benchmarks/bench_sharded_masks.py                 # 2 gloo ranks, Pythia-160M shape
    python benchmarks/bench_sharded_masks.py --size tiny --steps 2 --out /tmp/x.json   # rehearsal

For each layout (``replicated``: every rank holds all mask logits, gradients all-reduced;
``sharded``: ``data_parallel(shard_masks=True)``, a :class:`~bigram_circuits.distributed.ShardedMaskSet`)
two gloo ranks on CPU build the search state of a randomly initialised Pythia-shaped GPT-NeoX
(``benchmarks/bench_masks.random_pythia_bridge``) and run ``--steps`` search steps
(``search_step``, next-token target, global batch ``--batch`` x ``--seq-len`` split over the
ranks). Each rank reports:

- ``mask_state_bytes``: the bytes of the mask state it holds after the steps, counted from the
  tensors: its logits, their gradients and AdamW's moments (local shards when sharded);
- ``built_peak_rss_mb``, ``steps_peak_rss_mb``, ``peak_rss_mb``: ``ru_maxrss`` of the rank's
  process once the search state is built, after the steps, and at the end (after gathering the
  full logits for the comparison); ``peak_added_mb`` is ``steps_peak_rss_mb`` minus the RSS once
  the model was loaded (what building the state and the steps added, transients included);
- ``step_cpu_s``: process CPU seconds per step (median; the first step is left out).

Ranks start with ``MALLOC_MMAP_THRESHOLD_=1048576`` (unless set), so that RSS follows live
tensors rather than what glibc's heap kept. The layouts run one after the other (never at the
same time); both end with the same logits, which the result checks (``max_logit_difference``).
Writes one JSON (default ``benchmarks/results/bench_sharded_masks.json``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_OUT = REPO / "benchmarks" / "results" / "bench_sharded_masks.json"
LAYOUTS = ("replicated", "sharded")


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _state_bytes(state) -> int:
    """Bytes of the logits, gradients and optimizer moments this rank holds."""

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    total = 0
    for key in state.mask_set.keys:
        param = state.mask_set.parameter(key)
        total += local(param).numel() * local(param).element_size()
        if param.grad is not None:
            total += local(param.grad).numel() * local(param.grad).element_size()
        for value in state.optimizer.state.get(param, {}).values():
            if torch.is_tensor(value) and value.dim() > 0:
                total += local(value).numel() * local(value).element_size()
    return total


def _rank(rank: int, world: int, port: int, layout: str, args: dict, out: str) -> None:
    from bigram_circuits.distributed import data_parallel
    from bigram_circuits.models import frozen_parameters
    from bigram_circuits.search import SearchConfig, SearchState, Target, search_step

    torch.set_num_threads(1)
    gpu_check, memory = _script("gpu_check"), _script("bench_memory")
    with tempfile.TemporaryDirectory() as workdir:
        bridge = _script("bench_masks").random_pythia_bridge(gpu_check.SHAPES[args["size"]], "cpu", Path(workdir))
    bridge.eval()
    loaded_mb = memory.rss_mb()
    windows = gpu_check.synthetic_windows(args["batch"] * args["steps"], args["seq_len"], bridge.cfg.d_vocab)
    config = SearchConfig(lam=1.0, batch_size=args["batch"], seq_len=args["seq_len"], max_steps=args["steps"])
    target = Target.next_token()
    run = {"config": config.to_dict(), "granularities": ["weight"], "target": target.name, "model_id": "bench"}
    init = f"tcp://127.0.0.1:{port}"
    with data_parallel("gloo", rank=rank, world_size=world, init_method=init, shard_masks=layout == "sharded") as group:
        with frozen_parameters(bridge):
            state = SearchState.fresh(bridge, config, run)
            built_peak_mb = memory.peak_mb()
            cpu = []
            for step in range(args["steps"]):
                batch = windows[step * args["batch"] : (step + 1) * args["batch"]]
                tokens = torch.as_tensor(group.shard(batch))
                started = time.process_time()
                search_step(state, bridge, tokens, target, config)
                cpu.append(time.process_time() - started)
        steps_peak_mb = memory.peak_mb()
        logits = {key: state.mask_set.logit(key).detach().clone() for key in state.mask_set.keys}  # collective
        report = {
            "rank": rank,
            "mask_state_bytes": _state_bytes(state),
            "loaded_rss_mb": loaded_mb,
            "built_peak_rss_mb": built_peak_mb,
            "steps_peak_rss_mb": steps_peak_mb,
            "peak_rss_mb": memory.peak_mb(),
            "step_cpu_s": statistics.median(cpu[1:] if len(cpu) > 1 else cpu),
            "masked_weights": sum(c.n_entries for c in state.mask_set.components.values()),
        }
        report["peak_added_mb"] = steps_peak_mb - loaded_mb
        Path(out).with_suffix(f".rank{rank}.json").write_text(json.dumps(report))
        if rank == 0:
            torch.save(logits, Path(out).with_suffix(".logits.pt"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_layout(layout: str, args: dict, workdir: Path) -> tuple[dict, dict]:
    import torch.multiprocessing as mp

    out = workdir / layout
    started = time.perf_counter()
    mp.start_processes(_rank, args=(2, _free_port(), layout, args, str(out)), nprocs=2, join=True, start_method="spawn")
    ranks = [json.loads(out.with_suffix(f".rank{r}.json").read_text()) for r in range(2)]
    logits = torch.load(out.with_suffix(".logits.pt"), weights_only=True)
    return {"ranks": ranks, "wall_s": time.perf_counter() - started}, logits


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="160m", choices=["tiny", "70m", "160m"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = vars(parser.parse_args(argv))
    out_path = args.pop("out")
    # Large blocks straight from mmap and back on free, so a rank's RSS follows its live tensors
    # (glibc's growing mmap threshold otherwise keeps freed transients in the heap).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    results = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "cpu_count": torch.get_num_threads()},
        "settings": {
            **args,
            "MALLOC_MMAP_THRESHOLD_": os.environ["MALLOC_MMAP_THRESHOLD_"],
            "ranks": 2,
            "backend": "gloo",
            "granularity": "weight",
            "torch_threads_per_rank": 1,
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        logits = {}
        for layout in LAYOUTS:
            results[layout], logits[layout] = run_layout(layout, args, Path(tmp))
            print(layout, json.dumps(results[layout]), flush=True)
    a, b = logits["replicated"], logits["sharded"]
    results["max_logit_difference"] = max(float((a[k] - b[k]).abs().max()) for k in a)
    rep, sha = results["replicated"]["ranks"], results["sharded"]["ranks"]
    results["ratios"] = {
        "mask_state_bytes_sharded_over_replicated": [
            s["mask_state_bytes"] / r["mask_state_bytes"] for r, s in zip(rep, sha)
        ],
        "peak_added_sharded_over_replicated": [s["peak_added_mb"] / r["peak_added_mb"] for r, s in zip(rep, sha)],
        "step_cpu_sharded_over_replicated": [s["step_cpu_s"] / r["step_cpu_s"] for r, s in zip(rep, sha)],
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["ratios"], indent=2), f"max logit difference {results['max_logit_difference']:.2e}")
    return results


if __name__ == "__main__":
    main()
