"""Mixtral, Qwen3-MoE and Qwen2-MoE, checked against transformers itself: a tiny model of each family
(made and saved by transformers, one tensor per expert on disk) → `llmforge import hf` → the same
logits at EP=1 and EP=2, `llmforge generate` continues the prompt with exactly transformers' greedy
tokens at both, `export hf` gives back the same tensors and config from the import and from a
checkpoint saved at EP=2, and the export's self-check catches an expert written wrong. MoE
options an HF config may hold that llmforge does not compute are refused by field.

The three families are made and imported once (module fixture); the EP=2 checks of all three run
in one 2-process launch (`moe_layout_worker.py`).
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
from llmforge.interop.export import export_hf, export_target
from llmforge.interop.hf_files import read_hf_weights
from llmforge.interop.import_ import import_hf
from llmforge.spec.components import GPTModel

from .families_tiny import PROMPT, VOCAB, greedy
from .moe_tiny import FAMILIES, SPECS, save_moe_family
from .tiny import forward, random_ids, run_two_ranks

transformers = pytest.importorskip("transformers")
ATOL = 1e-4
EXACT = 1e-5  # the self-check's relative figure on an untouched model (its tolerance is 1e-3)
WORKER = Path(__file__).with_name("moe_layout_worker.py")
IDS = random_ids(batch=2, seq=48, vocab=VOCAB, seed=4)
VOLATILE = {"transformers_version", "_name_or_path"}
# What each family's model.yaml must say about its experts and attention.
SWITCHES = {
    "mixtral": {"num_moe_experts": 4, "moe_router_topk": 2, "moe_router_pre_softmax": False, "moe_aux_loss_coeff": 0.02,
                "untie_embeddings_and_output_weights": True, "ffn_hidden_size": 96},
    "qwen3_moe": {"num_moe_experts": 4, "moe_router_pre_softmax": False, "moe_ffn_hidden_size": 48, "qk_layernorm": True, "kv_channels": 32},
    "qwen2_moe": {"num_moe_experts": 4, "moe_router_pre_softmax": True, "moe_ffn_hidden_size": 48, "add_qkv_bias": True,
                  "moe_shared_expert_intermediate_size": 80, "moe_shared_expert_gate": True},
}


@dataclass(frozen=True)
class Imported:
    hf_dir: Path
    out: Path
    logits: torch.Tensor  # transformers' logits on IDS
    continuation: list[int]  # transformers' greedy continuation of PROMPT

    @property
    def step_dir(self) -> Path:
        return self.out / "checkpoints" / "import" / "step-0"


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict[str, Imported]:
    root = tmp_path_factory.mktemp("moe-families")
    made = {}
    for family in FAMILIES:
        hf_dir = save_moe_family(family, root / "hf" / family)
        import_hf(hf_dir, root / "out" / family)
        model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(IDS).logits.float()
        made[family] = Imported(hf_dir, root / "out" / family, logits, greedy(model, transformers.AutoTokenizer.from_pretrained(hf_dir)))
    return made


def _load_imported(out: Path):
    from llmforge.interop.export import model_options
    from llmforge.interop.model_io import single_process_model
    from llmforge.runtime.sharded_io import load_sharded

    module = single_process_model(model_options(out))
    load_sharded(out / "checkpoints" / "import" / "step-0" / "model", [module], None)
    return module


def _config(path: Path) -> dict:
    return {k: v for k, v in transformers.AutoConfig.from_pretrained(path).to_dict().items() if k not in VOLATILE}


def _same_weights(original: Path, exported: Path) -> None:
    theirs, ours = read_hf_weights(original), read_hf_weights(exported)
    assert theirs.keys() == ours.keys()
    for name, tensor in theirs.items():
        assert (ours[name].dtype, ours[name].shape) == (tensor.dtype, tensor.shape), name
        assert torch.equal(ours[name], tensor), name


def test_save_pretrained_writes_one_tensor_per_expert(imported):
    """The layout import reads and export writes is what transformers writes (it fuses experts only in memory)."""
    names = set(read_hf_weights(imported["mixtral"].hf_dir))
    assert {f"model.layers.1.block_sparse_moe.experts.3.{w}.weight" for w in ("w1", "w2", "w3")} <= names
    for family in ("qwen3_moe", "qwen2_moe"):
        names = set(read_hf_weights(imported[family].hf_dir))
        assert {f"model.layers.1.mlp.experts.3.{w}.weight" for w in ("gate_proj", "up_proj", "down_proj")} <= names
        assert not [n for n in names if "gate_up_proj" in n]
    assert "model.layers.0.mlp.shared_expert_gate.weight" in read_hf_weights(imported["qwen2_moe"].hf_dir)


@pytest.mark.parametrize("family", FAMILIES)
def test_import_gives_transformers_logits_and_records_the_family(imported, family):
    case = imported[family]
    model = yaml.safe_load((case.out / "model.yaml").read_text())["model"]
    assert {k: model.get(k) for k in SWITCHES[family]} == SWITCHES[family]
    record = json.loads((case.out / "hf_source.json").read_text())
    assert (record["family"], record["architecture"]) == (family, SPECS[family][3])
    torch.testing.assert_close(forward(_load_imported(case.out), IDS), case.logits, atol=ATOL, rtol=0)


def test_the_shared_expert_gate_shows_in_the_logits(imported, tmp_path):
    """Qwen2-MoE without its shared expert's gate computes other logits: the check above has teeth."""
    from safetensors.torch import load_file, save_file

    hf_dir = shutil.copytree(imported["qwen2_moe"].hf_dir, tmp_path / "hf")
    tensors = load_file(hf_dir / "model.safetensors")
    for name in [n for n in tensors if n.endswith("shared_expert_gate.weight")]:
        tensors[name] = torch.full_like(tensors[name], 30.0)  # sigmoid ≈ 1: an ungated shared expert
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (model(IDS).logits - imported["qwen2_moe"].logits).abs().max() > 100 * ATOL


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_on_the_import_continues_as_transformers_does(imported, family):
    from llmforge.interop.generate import TextGenerator

    generator = TextGenerator(imported[family].step_dir)
    try:
        assert generator.continuation_ids(PROMPT, max_new_tokens=32) == imported[family].continuation
    finally:
        generator.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_import_then_export_gives_back_the_same_model(imported, tmp_path, family):
    case = imported[family]
    messages: list[str] = []
    done = export_hf(case.out, tmp_path / "back", log=messages.append)
    assert done["architecture"] == SPECS[family][3]
    assert _config(tmp_path / "back") == _config(case.hf_dir)
    _same_weights(case.hf_dir, tmp_path / "back")
    check = done["check"]
    assert check["passed"] and check["relative"] < EXACT, check


def _swap_gate_and_up_of_one_expert(monkeypatch) -> None:
    """A layout bug of the kind converters make: expert 1 of layer 0 gets its gate and up projections swapped."""
    from llmforge.interop import hf_mapping

    real = hf_mapping.link_to_hf

    def wrong(link, tensor, d):
        out = real(link, tensor, d)
        return out[::-1] if link.megatron == "decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight" else out

    monkeypatch.setattr(hf_mapping, "link_to_hf", wrong)


def test_the_self_check_refuses_an_expert_written_wrong(imported, tmp_path, monkeypatch, capsys):
    _swap_gate_and_up_of_one_expert(monkeypatch)
    target = tmp_path / "back"
    assert main(["export", "hf", str(imported["mixtral"].out), str(target)]) == 1
    captured = capsys.readouterr()
    assert "self-check (transformers MixtralForCausalLM): max |logit difference|" in captured.out and ": FAILED" in captured.out
    assert not target.exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_without_a_record_the_shape_picks_the_moe_class(imported, tmp_path, family):
    model = yaml.safe_load((imported[family].out / "model.yaml").read_text())["model"]
    options = GPTModel.model_validate({k: v for k, v in model.items() if k != "name"})
    assert export_target(tmp_path, options).family.hf_class == SPECS[family][3]
    # A dense family never takes an MoE model (its experts would be dropped).
    dense = options.model_copy(update={"num_moe_experts": None, "moe_ffn_hidden_size": None, "moe_shared_expert_intermediate_size": None,
                                       "moe_shared_expert_gate": False})
    assert "Moe" not in export_target(tmp_path, dense).family.hf_class and "Mixtral" not in export_target(tmp_path, dense).family.hf_class


def _edited(case: Imported, tmp_path: Path, **changes) -> Path:
    hf_dir = shutil.copytree(case.hf_dir, tmp_path / "hf")
    data = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**data, **changes}))
    return hf_dir


@pytest.mark.parametrize(("family", "changes", "needle"), [
    ("qwen3_moe", {"decoder_sparse_step": 2}, "Qwen3MoeForCausalLM with decoder_sparse_step 2 (needs 1"),
    ("qwen2_moe", {"mlp_only_layers": [1]}, "Qwen2MoeForCausalLM with mlp_only_layers [1] (needs []"),
    ("qwen2_moe", {"qkv_bias": False}, "qkv_bias false"),
    ("mixtral", {"router_jitter_noise": 0.1}, "MixtralForCausalLM with router_jitter_noise 0.1 (needs 0"),
    ("mixtral", {"num_experts_per_tok": 1}, "num_experts_per_tok 1 with renormalised top-k weights"),
    ("qwen3_moe", {"scoring_func": "sigmoid"}, "scoring_func 'sigmoid'"),
    ("mixtral", {"sliding_window": 4096}, "sliding_window 4096 (must be null"),
])
def test_unsupported_moe_options_are_refused_by_field(imported, tmp_path, capsys, family, changes, needle):
    hf_dir = _edited(imported[family], tmp_path, **changes)
    out = tmp_path / "out"
    assert main(["import", "hf", str(hf_dir), str(out)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err
    assert not out.exists()


def test_a_shared_expert_gate_without_a_shared_expert_is_refused_at_its_key():
    from pydantic import ValidationError

    options = yaml.safe_load((Path(__file__).resolve().parents[3] / "specs" / "models" / "qwen2-57b-a14b.yaml").read_text())["model"]
    options = {k: v for k, v in options.items() if k != "name"}
    with pytest.raises(ValidationError, match="moe_shared_expert_gate scales the shared expert, but moe_shared_expert_intermediate_size is null"):
        GPTModel.model_validate({**options, "moe_shared_expert_intermediate_size": None})


def test_qwen2_57b_a14b_fragment_is_the_published_model_and_plans_to_transformers_count(capsys, tmp_path):
    """specs/models/qwen2-57b-a14b.yaml is what import makes of the published config.json, and `llmforge plan`
    counts exactly the parameters transformers allocates for it (built on the meta device)."""
    from llmforge.interop.families import FAMILIES as ALL
    from llmforge.registry.manager import reset_registry

    # Qwen/Qwen2-57B-A14B's config.json, as published.
    config = {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "decoder_sparse_step": 1, "hidden_act": "silu",
              "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 131072,
              "max_window_layers": 28, "moe_intermediate_size": 2560, "norm_topk_prob": False, "num_attention_heads": 28,
              "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
              "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "shared_expert_intermediate_size": 20480, "sliding_window": 131072,
              "tie_word_embeddings": False, "use_sliding_window": False, "vocab_size": 151936}
    with torch.device("meta"):
        hf = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(**config))
    published = sum(p.numel() for p in hf.parameters())

    root = Path(__file__).resolve().parents[3]
    fragment = root / "specs" / "models" / "qwen2-57b-a14b.yaml"
    ours = {k: v for k, v in yaml.safe_load(fragment.read_text())["model"].items() if k != "name"}
    imported = ALL["qwen2_moe"].from_config(config, "config.json")
    fields = GPTModel.model_validate(ours).model_dump()
    assert {k: v for k, v in GPTModel.model_validate(imported).model_dump().items() if k != "seq_length"} == \
        {k: v for k, v in fields.items() if k != "seq_length"}

    reset_registry()
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"extends: [{root / 'specs' / '7b-pretrain.yaml'}, {fragment}]\n")
    assert main(["plan", str(spec), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params_total"] == published == 57_408_658_944


@pytest.mark.slow
def test_ep2_gives_transformers_logits_and_tokens_and_exports_back(imported, tmp_path):
    cases = {f: {"step_dir": str(c.step_dir), "prompt": PROMPT} for f, c in imported.items()}
    run_two_ranks(WORKER, {"cases": cases, "ids": IDS.tolist(), "out": str(tmp_path)})
    for family, case in imported.items():
        got = torch.load(tmp_path / f"{family}-ep2.pt")
        assert got["layout"] == "TP 1 × PP 1 × DP 2 (experts: EP 2) over 2 processes" and got["experts"] == [[0, 1], [0, 1]], got
        torch.testing.assert_close(got["logits"], case.logits, atol=ATOL, rtol=0, msg=lambda m, f=family: f"{f} EP2: {m}")
        assert got["continuation"] == case.continuation, family
        # The checkpoint saved at EP=2 (each rank two experts) exports in one process as the same model.
        done = export_hf(tmp_path / f"{family}-run", tmp_path / f"{family}-back", log=lambda m: None)
        assert done["architecture"] == SPECS[family][3] and done["check"]["relative"] < EXACT
        assert _config(tmp_path / f"{family}-back") == _config(case.hf_dir)
        _same_weights(case.hf_dir, tmp_path / f"{family}-back")
