"""Hugging Face Hub round trip, offline: a Hub-style folder, a repo id read from a populated HF
cache with the network off, the authors' pickle repos by name, and ``push_to_hub`` up to the
client's network calls (``HfApi.create_repo`` / ``create_commit`` replaced)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, constants
from huggingface_hub.hf_api import HfApi

from bigram_circuits.errors import HubError, MaskError, UnsafeFileError
from bigram_circuits.hub import pick_author_file
from bigram_circuits.subnetwork import Subnetwork

COMMIT = "0123456789abcdef0123456789abcdef01234567"
METADATA = {
    "model": "EleutherAI/pythia-160m",
    "model_revision": "step143000",
    "tokenizer_fingerprint": "tok-3f2a",
    "corpus": "default",
    "corpus_sha256": "c0ffee",
    "target": "bigram",
    "schedule": "fast",
    "config": {"lam": 10.0, "seed": 0, "parameterization": "continuous"},
    "metrics": {"bigram_r": 0.8125, "target_loss": 3.5, "steps": 120, "stop_reason": "converged"},
}


def _subnetwork(bridge, seed: int = 3, metadata=METADATA) -> Subnetwork:
    full = Subnetwork.full(bridge, "weight")
    return full.random_control(seed=seed).with_masks(full.random_control(seed=seed).masks, metadata)


def _same(a: Subnetwork, b: Subnetwork) -> bool:
    return set(a.masks) == set(b.masks) and all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)


def _cache_repo(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT) -> Path:
    """The HF cache layout of one model repo: ``models--owner--name/{refs/main, snapshots/<commit>/}``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    """An empty HF cache with the Hub switched off (the env vars and the client's constants)."""
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_save_pretrained_folder_round_trip_and_model_card(tiny_neox, tmp_path):
    bridge, _ = tiny_neox
    sub = _subnetwork(bridge)
    folder = sub.save_pretrained(tmp_path / "sub", repo_id="someone/tiny-bigram")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "masks.safetensors", "subnetwork.json"]
    back = Subnetwork.from_pretrained(folder, bridge=bridge)
    assert _same(back, sub) and back.metadata == sub.metadata and back.model_id == sub.model_id
    assert _same(Subnetwork.load(folder), sub)  # a Hub-style folder is still a saved subnetwork

    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "bigram_circuits"
    assert "bigram-circuits" in card.data.tags and "arxiv:2504.15471" in card.data.tags
    assert card.data.base_model == "EleutherAI/pythia-160m"
    for text in [
        sub.model_id,
        "step143000",
        "tok-3f2a",
        "c0ffee",
        "| granularity | weight |",
        "| lambda (sparsity weight) | 10 |",
        "| schedule | fast |",
        "0.8125",
        "## Layer distribution",
        'Subnetwork.from_pretrained("someone/tiny-bigram", bridge=bridge)',
    ]:
        assert text in card.text, text
    loading = card.text.split("```python\n")[1].split("```")[0]
    assert len(loading.strip().splitlines()) == 3


def test_model_card_says_what_was_not_recorded(tiny_neox):
    card = _subnetwork(tiny_neox[0], metadata={"model": "/some/local/dir"}).model_card()
    assert "base_model" not in card.split("---")[1]  # a local path is not a Hub model id
    assert "| tokenizer fingerprint | not recorded |" in card


def test_from_pretrained_checks_the_model(tiny_neox, tiny_gpt2, tmp_path):
    folder = _subnetwork(tiny_neox[0]).save_pretrained(tmp_path / "sub")
    with pytest.raises(MaskError, match="made for model"):
        Subnetwork.from_pretrained(folder, bridge=tiny_gpt2[0])


def test_from_pretrained_by_repo_id_from_the_offline_cache(tiny_neox, tmp_path, offline_cache):
    bridge, _ = tiny_neox
    sub = _subnetwork(bridge)
    folder = sub.save_pretrained(tmp_path / "sub")
    _cache_repo(offline_cache, "someone/tiny-bigram", {p.name: p.read_bytes() for p in folder.iterdir()})

    back = Subnetwork.from_pretrained("someone/tiny-bigram", bridge=bridge)
    assert _same(back, sub) and back.metadata == sub.metadata
    assert _same(Subnetwork.from_pretrained("someone/tiny-bigram", revision=COMMIT), sub)
    tokens = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        with sub.applied(bridge):
            expected = bridge(tokens)
        with back.applied(bridge):
            assert torch.equal(bridge(tokens), expected)

    with pytest.raises(HubError, match="not in the Hugging Face cache") as info:
        Subnetwork.from_pretrained("someone/not-cached")
    assert "\n" not in str(info.value)
    with pytest.raises(HubError, match="neither a folder nor"):
        Subnetwork.from_pretrained("not a repo id")


def test_a_fresh_process_loads_by_repo_id_with_the_network_off(tiny_neox, tiny_neox_dir, tmp_path):
    """The real thing: HF_HUB_OFFLINE=1 and HF_HUB_CACHE set before huggingface_hub is imported."""
    bridge, _ = tiny_neox
    sub = _subnetwork(bridge)
    folder = sub.save_pretrained(tmp_path / "sub")
    cache = tmp_path / "hf_cache"
    _cache_repo(cache, "someone/tiny-bigram", {p.name: p.read_bytes() for p in folder.iterdir()})
    script = textwrap.dedent(
        f"""
        import torch
        from bigram_circuits.models import load_model
        from bigram_circuits.subnetwork import Subnetwork
        bridge, _ = load_model({str(tiny_neox_dir)!r})
        sub = Subnetwork.from_pretrained("someone/tiny-bigram", bridge=bridge)
        with torch.no_grad(), sub.applied(bridge):
            logits = bridge(torch.tensor([[1, 5, 9, 2]]))
        print("kept", sub.n_params(), "of", sub.n_params_total(), "logits", tuple(logits.shape))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"kept {sub.n_params()} of {sub.n_params_total()}" in done.stdout


def test_the_authors_pickle_repo_by_name(tiny_neox, tmp_path, offline_cache):
    bridge, _ = tiny_neox
    big, small = _subnetwork(bridge, seed=1), _subnetwork(bridge, seed=2)
    repo = "tylerachang/bigram-subnetworks-pythia-160m"
    files = {
        "subnetwork_dict_lambda1e1.pickle": big.save_author_pickle(tmp_path / "a.pickle").read_bytes(),
        "subnetwork_dict_lambda1.pickle": small.save_author_pickle(tmp_path / "b.pickle").read_bytes(),
        "README.md": b"# bigram subnetworks\n",
    }
    _cache_repo(offline_cache, repo, files)

    default = Subnetwork.from_pretrained(repo, bridge=bridge)  # the largest lambda, as the authors' loader
    assert _same(default, big) and default.metadata["source_file"] == "subnetwork_dict_lambda1e1.pickle"
    assert default.metadata["source_repo"] == repo and default.metadata["source_revision"] == COMMIT
    assert _same(Subnetwork.from_pretrained(repo, bridge=bridge, lam=1), small)
    assert _same(Subnetwork.from_pretrained(repo, bridge=bridge, filename="subnetwork_dict_lambda1.pickle"), small)
    with pytest.raises(MaskError, match="pass bridge="):
        Subnetwork.from_pretrained(repo)
    with pytest.raises(MaskError, match="no mask for lambda 100"):
        Subnetwork.from_pretrained(repo, bridge=bridge, lam=100)

    evil = {"gpt_neox.layers.0.attention.dense.weight": _Exploit(tmp_path / "pwned")}
    _cache_repo(offline_cache, "someone/evil", {"masks.pickle": pickle.dumps(evil)})
    with pytest.raises(UnsafeFileError):
        Subnetwork.from_pretrained("someone/evil", bridge=bridge)
    assert not (tmp_path / "pwned").exists()


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize(
    ("names", "kwargs", "expected"),
    [
        (["x.pkl"], {}, "x.pkl"),
        (
            ["subnetwork_dict_lambda1.pickle", "subnetwork_dict_lambda1e2.pickle"],
            {},
            "subnetwork_dict_lambda1e2.pickle",
        ),
        (
            ["subnetwork_dict_lambda1.pickle", "subnetwork_dict_lambda1e1.pickle"],
            {"lam": 1},
            "subnetwork_dict_lambda1.pickle",
        ),
        (["a.pickle", "b.pickle"], {"filename": "b.pickle"}, "b.pickle"),
    ],
)
def test_pick_author_file(names, kwargs, expected):
    assert pick_author_file(names, **kwargs) == expected


def test_pick_author_file_refuses_ambiguity():
    with pytest.raises(MaskError, match="pass filename="):
        pick_author_file(["a.pickle", "b.pickle"])
    with pytest.raises(MaskError, match="neither"):
        pick_author_file(["README.md"])


def test_push_to_hub_sends_the_saved_files_in_one_commit(tiny_neox, tmp_path, monkeypatch):
    """Everything up to the network: the repo it would create and the exact commit it would send."""
    sub = _subnetwork(tiny_neox[0])
    calls: list[tuple[str, tuple, dict]] = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", (repo_id,), kwargs))
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, repo_id, operations, **kwargs):
        calls.append(("create_commit", (repo_id, list(operations)), {**kwargs, "token": self.token}))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/{COMMIT}"})()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    url = sub.push_to_hub("someone/tiny-bigram", private=True, token="hf_test")

    assert url == f"https://huggingface.co/someone/tiny-bigram/commit/{COMMIT}"
    assert [c[0] for c in calls] == ["create_repo", "create_commit"]
    assert calls[0][2] == {"private": True, "exist_ok": True, "repo_type": "model"}
    _, (repo_id, operations), kwargs = calls[1]
    assert repo_id == "someone/tiny-bigram" and kwargs["token"] == "hf_test" and kwargs["repo_type"] == "model"
    percent = sub.summary()["percent_params"]
    assert kwargs["commit_message"] == f"Upload bigram subnetwork ({percent:.3g}% of weights)"
    sent = {op.path_in_repo: op.path_or_fileobj for op in operations}
    assert sorted(sent) == ["README.md", "masks.safetensors", "subnetwork.json"]
    folder = sub.save_pretrained(tmp_path / "same", repo_id="someone/tiny-bigram")
    assert sent == {name: (folder / name).read_bytes() for name in sent}


def test_push_errors_are_one_hub_error_line(tiny_neox, monkeypatch):
    import httpx2  # huggingface_hub's HTTP client: a real 401 response object, no request sent
    from huggingface_hub.errors import HfHubHTTPError

    def refuse(self, repo_id, **kwargs):
        request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
        response = httpx2.Response(401, request=request)
        raise HfHubHTTPError("401 Client Error: Unauthorized\nInvalid credentials", response=response)

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    with pytest.raises(HubError, match="check the token") as info:
        _subnetwork(tiny_neox[0]).push_to_hub("someone/tiny-bigram")
    assert "\n" not in str(info.value)
    with pytest.raises(HubError, match="not a Hub repo id"):
        _subnetwork(tiny_neox[0]).push_to_hub("no slash")
