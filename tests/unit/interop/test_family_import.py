"""Llama 3.x, Mistral, Qwen2.5 and Qwen3, checked against transformers itself: a tiny model of each
family (made and saved by transformers, with a trained byte-level BPE tokenizer) → `llmforge
import hf` → the same logits at TP=1, TP=2 and PP=2, and `llmforge generate` on the imported
checkpoint continues the prompt with exactly transformers' greedy tokens, stopping at any
eos id of generation_config.json. Unsupported config values are refused by field, exit 2,
nothing left in OUT.

The four families are made and imported once (module fixture); the TP=2 and PP=2 layouts of
all four run in one 2-process launch.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from llmforge.cli import main
from llmforge.interop.import_ import import_hf

from .families_tiny import FAMILIES, PROMPT, VOCAB, greedy, save_family
from .tiny import forward, random_ids, run_two_ranks

transformers = pytest.importorskip("transformers")
ATOL = 1e-4
WORKER = Path(__file__).with_name("family_layout_worker.py")
IDS = random_ids(batch=2, seq=48, vocab=VOCAB, seed=4)
# What each family's model.yaml must say (beyond the shape every family shares).
SWITCHES = {
    "llama": {"rotary_base": 500000.0, "rope_scaling_factor": 32.0, "untie_embeddings_and_output_weights": False},
    "mistral": {"rotary_base": 1000000.0, "untie_embeddings_and_output_weights": True, "add_bias_linear": False},
    "qwen2": {"rotary_base": 1000000.0, "add_qkv_bias": True, "add_bias_linear": False, "untie_embeddings_and_output_weights": False},
    "qwen3": {"rotary_base": 1000000.0, "qk_layernorm": True, "kv_channels": 32, "add_bias_linear": False},
}
HF_CLASS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@dataclass(frozen=True)
class Imported:
    hf_dir: Path
    out: Path
    logits: torch.Tensor  # transformers' logits on IDS
    continuation: list[int]  # transformers' greedy continuation of PROMPT
    prompt_ids: list[int]  # PROMPT as transformers tokenizes it by default

    @property
    def step_dir(self) -> Path:
        return self.out / "checkpoints" / "import" / "step-0"


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict[str, Imported]:
    root = tmp_path_factory.mktemp("families")
    made = {}
    for family in FAMILIES:
        hf_dir = save_family(family, root / "hf" / family)
        import_hf(hf_dir, root / "out" / family)
        model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
        with torch.no_grad():
            logits = model(IDS).logits.float()
        made[family] = Imported(hf_dir, root / "out" / family, logits, greedy(model, tokenizer), tokenizer(PROMPT)["input_ids"])
    return made


def _load_imported(out: Path):
    from llmforge.interop.export import model_options
    from llmforge.interop.model_io import single_process_model
    from llmforge.runtime.sharded_io import load_sharded

    module = single_process_model(model_options(out))
    load_sharded(out / "checkpoints" / "import" / "step-0" / "model", [module], None)
    return module


@pytest.mark.parametrize("family", FAMILIES)
def test_import_gives_transformers_logits_and_records_the_family(imported, family):
    case = imported[family]
    model = yaml.safe_load((case.out / "model.yaml").read_text())["model"]
    assert {k: model.get(k, False) for k in SWITCHES[family]} == SWITCHES[family]
    record = json.loads((case.out / "hf_source.json").read_text())
    assert (record["family"], record["architecture"], record["config"]["architectures"]) == (family, HF_CLASS[family], [HF_CLASS[family]])
    torch.testing.assert_close(forward(_load_imported(case.out), IDS), case.logits, atol=ATOL, rtol=0)


def test_the_llama3_rope_scaling_shows_in_these_logits(imported, tmp_path):
    """Without its llama3 scaling the tiny Llama computes other logits: the check above has teeth."""
    config = json.loads((imported["llama"].hf_dir / "config.json").read_text())
    plain = {**config, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}
    hf_dir = shutil.copytree(imported["llama"].hf_dir, tmp_path / "hf")
    (hf_dir / "config.json").write_text(json.dumps(plain))
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        unscaled = model(IDS).logits
    assert (unscaled - imported["llama"].logits).abs().max() > 100 * ATOL


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_on_the_import_continues_as_transformers_does(imported, family, capsys):
    from llmforge.interop.generate import TextGenerator

    case = imported[family]
    generator = TextGenerator(case.step_dir)
    try:
        assert generator.prompt_ids(PROMPT) == case.prompt_ids  # BOS exactly when transformers adds it
        assert generator.continuation_ids(PROMPT, max_new_tokens=32) == case.continuation
    finally:
        generator.close()
    if family == "llama":  # it stopped at the second eos id generation_config.json lists, not the tokenizer's first
        assert case.continuation[-1] == generator.tokenizer.token_to_id("<|eot_id|>") and len(case.continuation) < 32
        assert generator.tokenizer.stop_ids == (generator.tokenizer.token_to_id("<|end_of_text|>"), case.continuation[-1])
    assert main(["generate", str(case.step_dir), "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "32"]) == 0
    text = transformers.AutoTokenizer.from_pretrained(case.hf_dir).decode([t for t in case.continuation if t not in generator.tokenizer.stop_ids])
    assert capsys.readouterr().out == PROMPT + text + "\n"


def test_a_run_naming_the_imported_tokenizer_keeps_its_files_and_stops(imported, tmp_path):
    """What prepare does with model.yaml's `tokenizer:` section: build it, save it into the run dir."""
    from llmforge.data.tokenizers import build_pretrained, load_tokenizer
    from llmforge.spec.components import PretrainedTokenizer

    case = imported["llama"]
    section = yaml.safe_load((case.out / "model.yaml").read_text())["tokenizer"]
    built = build_pretrained(PretrainedTokenizer.model_validate({k: v for k, v in section.items() if k != "name"}), run_dir=tmp_path,
                             texts=iter(()))
    built.save(tmp_path / "run" / "tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "run" / "tokenizer" / name).read_bytes() == (case.hf_dir / name).read_bytes(), name
    run_tokenizer = load_tokenizer(tmp_path / "run" / "tokenizer")
    assert len(run_tokenizer.stop_ids) == 2 and run_tokenizer.encode_sequence(PROMPT) == case.prompt_ids


@pytest.mark.slow
def test_tp2_and_pp2_give_transformers_logits_and_tokens(imported, tmp_path):
    cases = {f: {"step_dir": str(c.step_dir), "prompt": PROMPT} for f, c in imported.items()}
    run_two_ranks(WORKER, {"cases": cases, "ids": IDS.tolist(), "layouts": [[2, 1], [1, 2]], "out": str(tmp_path)})
    for family, case in imported.items():
        for tp, pp in ((2, 1), (1, 2)):
            got = torch.load(tmp_path / f"{family}-tp{tp}-pp{pp}.pt")
            assert got["layout"].startswith(f"TP {tp} × PP {pp} × DP 1"), got["layout"]
            torch.testing.assert_close(got["logits"], case.logits, atol=ATOL, rtol=0, msg=lambda m, f=family, t=tp, p=pp: f"{f} TP{t} PP{p}: {m}")
            assert got["continuation"] == case.continuation, (family, tp, pp)


def _edited(case: Imported, tmp_path: Path, name: str, **changes) -> Path:
    hf_dir = shutil.copytree(case.hf_dir, tmp_path / "hf")
    data = json.loads((hf_dir / name).read_text())
    for key, value in changes.items():
        parent, _, leaf = key.rpartition(".")
        (data[parent] if parent else data)[leaf] = value
    (hf_dir / name).write_text(json.dumps(data))
    return hf_dir


@pytest.mark.parametrize(("family", "file", "changes", "needle"), [
    ("llama", "config.json", {"rope_parameters.low_freq_factor": 2.0}, "rope_parameters.low_freq_factor 2.0 (megatron-core 0.16 fixes it at 1"),
    ("llama", "config.json", {"rope_parameters.high_freq_factor": 8.0}, "rope_parameters.high_freq_factor 8.0"),
    ("llama", "config.json", {"rope_parameters.original_max_position_embeddings": 4096},
     "rope_parameters.original_max_position_embeddings 4096"),
    ("llama", "config.json", {"rope_parameters.rope_type": "yarn"}, "rope_parameters.rope_type 'yarn' (supported: default, llama3)"),
    ("llama", "config.json", {"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ("llama", "generation_config.json", {"eos_token_id": [1, VOCAB + 5]}, "generation_config.json: eos_token_id [1, 325]"),
    ("mistral", "config.json", {"sliding_window": 4096}, "MistralForCausalLM with sliding_window 4096 (must be null"),
    ("qwen2", "config.json", {"use_sliding_window": True}, "Qwen2ForCausalLM with use_sliding_window true (must be false"),
    ("qwen3", "config.json", {"attention_bias": True}, "Qwen3ForCausalLM with attention_bias true"),
])
def test_unsupported_values_are_refused_by_field(imported, tmp_path, capsys, family, file, changes, needle):
    hf_dir = _edited(imported[family], tmp_path, file, **changes)
    out = tmp_path / "out"
    assert main(["import", "hf", str(hf_dir), str(out)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
